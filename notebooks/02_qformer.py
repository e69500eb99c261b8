# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2 — The Q-Former, one layer at a time
#
# BLIP-2 (Li et al., 2023) keeps its two large models frozen: an image encoder (EVA-CLIP ViT-g/14)
# and a language model. The only part it trains is the bridge between them, the **Querying
# Transformer**, or Q-Former. This chapter takes the Q-Former apart: we read what the paper
# says, draw the data flow, rebuild one layer by hand from the weights of `blip2_lite`'s
# `QFormer` and check that we get the same numbers, then look at the four ways stage 1 uses the
# one module and at where its parameters live.
#
# ## 1. What the paper says
#
# * **A BERT-base whose input starts with learned queries.** The input sequence is
#   `[queries; text]`: 32 learned vectors of width 768 (a parameter of shape `[1, 32, 768]`,
#   shared by every image), optionally followed by the word embeddings of a caption.
#   12 layers, 12 heads, initialised from `bert-base-uncased`.
# * **Self-attention is shared.** Queries and text go through the *same* self-attention weights.
#   A mask decides who sees whom, and that mask is what distinguishes the three stage-1
#   objectives (chapter 1 builds the masks).
# * **Cross-attention for the queries only, in every 2nd layer.** Layers 0, 2, ..., 10 insert a
#   cross-attention block in which the queries attend to the frozen image features
#   (keys and values projected from 1408 to 768). These blocks are new, randomly initialised.
#   Text never looks at the image directly: it can only see it through the queries.
# * **Two feed-forwards per layer.** Query positions and text positions have separate
#   feed-forward networks. The query copy is initialised from BERT's (text) copy, and the two
#   drift apart in training. (Here every weight is random, so the two copies differ from the start.)
# * **Embeddings.** Text gets word + position embeddings; the queries get **no** position
#   embedding. The embedding LayerNorm (and dropout) is applied to the whole `[queries; text]`
#   sequence, so the queries are normalised too.
#
# Why go to this trouble instead of handing the image features to the LLM? Because of the
# **bottleneck**. ViT-g/14 turns a 224-px image into 257 tokens (a class token + 16 x 16 patches)
# of width 1408. The Q-Former always returns 32 x 768 numbers per image, whatever the number of
# image tokens: the queries are the attending side of cross-attention, so the image only sets the
# length of the keys. The LLM therefore always reads 32 "soft tokens" (its cost does not grow
# with the image), and the queries are forced to extract the visual information that is most
# relevant to the text.
#
# We can check the shapes of the full-size model without allocating a single weight: on the
# `meta` device, tensors have shapes but no storage.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import FancyBboxPatch

from blip2_lite import Blip2Stage1, QFormer, QFormerConfig, attention_mask, draw_mask
from blip2_lite.parameters import count_parameters

torch.manual_seed(0)
torch.set_grad_enabled(False)  # this chapter only runs forward passes

# %%
full_config = QFormerConfig()  # the paper's sizes: BERT-base, 32 queries, ViT-g features
with torch.device("meta"):
    full_qformer = QFormer(full_config)
    for image_size in (224, 364):
        num_tokens = (image_size // 14) ** 2 + 1  # patches of 14 px, plus the class token
        image_features = torch.empty(2, num_tokens, full_config.encoder_width)
        query_output = full_qformer(image_embeds=image_features).query_output
        numbers_in, numbers_out = image_features[0].numel(), query_output[0].numel()
        print(
            f"{image_size} px: image features {list(image_features.shape)} -> query outputs "
            f"{list(query_output.shape)}   ({numbers_in:,} -> {numbers_out:,} numbers per image, "
            f"{numbers_in / numbers_out:.1f}x fewer)"
        )
        assert query_output.shape == (2, full_config.num_query_tokens, full_config.hidden_size)

# %% [markdown]
# ## 2. The picture: data flow with shapes
#
# One Q-Former pass, drawn with the full-size numbers. `B` is the batch, `T` the caption length
# (at most 32 tokens in the paper). Queries and text share the self-attention box; after it the
# sequence is split: the query slice visits the image (in cross-attention layers) and its own
# feed-forward, the text slice goes straight to the text feed-forward. The two slices are
# concatenated again before the next layer.

# %%
QUERY_COLOR, TEXT_COLOR, IMAGE_COLOR, SHARED_COLOR = "#fdd9b5", "#c9e8c5", "#c6dbef", "#dcd0ec"


def draw_box(ax, x, y, width, height, text, color):
    ax.add_patch(
        FancyBboxPatch(
            (x, y), width, height, boxstyle="round,pad=0,rounding_size=0.15", facecolor=color, edgecolor="black"
        )
    )
    ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=9)


def draw_arrow(ax, start, end, label="", label_offset=(0, 0.22)):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color="black", lw=1.2))
    if label:
        middle = ((start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1])
        ax.text(*middle, label, ha="center", va="center", fontsize=8.5, color="#333333")


def draw_qformer_data_flow(config: QFormerConfig, num_image_tokens: int = 257):
    Q, H, W = config.num_query_tokens, config.hidden_size, config.encoder_width
    cross_layers = ", ".join(str(i) for i in range(config.num_layers) if config.has_cross_attention(i))
    query_row, text_row, image_row, height = 3.2, 0.6, 6.1, 1.1  # bottom edges of the box rows
    query_mid, text_mid = query_row + height / 2, text_row + height / 2
    fig, ax = plt.subplots(figsize=(15.5, 5.6))

    draw_box(ax, 0, query_row, 2.3, height, f"learned queries\n[1, {Q}, {H}]\nno position emb.", QUERY_COLOR)
    draw_box(ax, 0, text_row, 2.3, height, "text tokens\n[B, T]", TEXT_COLOR)
    draw_box(ax, 3.0, text_row, 2.3, height, f"word + position\nembeddings\n[B, T, {H}]", TEXT_COLOR)
    both_rows = query_row + height - text_row
    draw_box(ax, 6.0, text_row, 1.9, both_rows, f"concat\n+ LayerNorm\n\n[B, {Q}+T, {H}]", SHARED_COLOR)
    self_attention_text = f"self-attention\n(shared by\nqueries and text)\n\n[B, {Q}+T, {H}]"
    draw_box(ax, 8.9, text_row, 2.4, both_rows, self_attention_text, SHARED_COLOR)
    draw_box(ax, 12.0, query_row, 2.9, height, f"cross-attention\nlayers {cross_layers}\n[B, {Q}, {H}]", QUERY_COLOR)
    image_text = f"frozen image features\n(ViT-g/14, 224 px)\n[B, {num_image_tokens}, {W}]"
    draw_box(ax, 12.0, image_row, 2.9, height, image_text, IMAGE_COLOR)
    draw_box(ax, 15.6, query_row, 1.9, height, f"query FFN\n[B, {Q}, {H}]", QUERY_COLOR)
    draw_box(ax, 15.6, text_row, 1.9, height, f"text FFN\n[B, T, {H}]", TEXT_COLOR)
    draw_box(ax, 18.5, query_row, 2.1, height, f"query outputs\n[B, {Q}, {H}]", QUERY_COLOR)
    draw_box(ax, 18.5, text_row, 2.1, height, f"text outputs\n[B, T, {H}]", TEXT_COLOR)

    ax.add_patch(
        FancyBboxPatch(
            (8.6, 0.15), 9.2, 4.95, boxstyle="round,pad=0,rounding_size=0.2",
            facecolor="none", edgecolor="gray", linestyle="--",
        )
    )
    ax.text(8.75, 4.85, f"× {config.num_layers} layers", fontsize=10, color="gray", va="center")

    draw_arrow(ax, (2.3, query_mid), (6.0, query_mid), "expand to batch B")
    draw_arrow(ax, (2.3, text_mid), (3.0, text_mid))
    draw_arrow(ax, (5.3, text_mid), (6.0, text_mid))
    draw_arrow(ax, (7.9, 2.5), (8.9, 2.5))
    draw_arrow(ax, (11.3, query_mid), (12.0, query_mid))
    draw_arrow(ax, (11.3, text_mid), (15.6, text_mid), f"text slice [B, T, {H}]")
    draw_arrow(ax, (13.45, image_row), (13.45, query_row + height), f"keys, values: {W} → {H}", (1.35, 0.4))
    draw_arrow(ax, (14.9, query_mid), (15.6, query_mid))
    draw_arrow(ax, (17.5, query_mid), (18.5, query_mid))
    draw_arrow(ax, (17.5, text_mid), (18.5, text_mid))

    ax.set_xlim(-0.2, 20.8)
    ax.set_ylim(0, image_row + height + 0.2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("One Q-Former pass (full-size numbers)", fontsize=12)
    return fig


draw_qformer_data_flow(full_config)
plt.show()

# %% [markdown]
# ## 3. A small Q-Former to compute with
#
# The full model has 186M parameters; for the numbers we use a miniature with the same structure,
# the course's running example `QFormerConfig.small()`: 4 layers (so cross-attention in layers 0
# and 2), 8 queries, width 64, image features of width 48 (and here a vocabulary of 200 words).
# `.eval()` turns dropout off, so every pass is deterministic. The batch holds 3 images of
# 10 tokens each and 3 captions of 6 tokens; the second caption is 4 tokens long plus 2 padding tokens.

# %%
config = QFormerConfig.small(vocab_size=200)
qformer = QFormer(config).eval()

batch_size, num_image_tokens, text_len = 3, 10, 6
num_queries = config.num_query_tokens
image_embeds = torch.randn(batch_size, num_image_tokens, config.encoder_width)
text_mask = torch.ones(batch_size, text_len, dtype=torch.long)
text_mask[1, 4:] = 0
input_ids = torch.randint(1, config.vocab_size, (batch_size, text_len)).masked_fill(text_mask == 0, config.pad_token_id)
print("image_embeds", list(image_embeds.shape), " input_ids", list(input_ids.shape))
print("cross-attention in layers", [i for i, layer in enumerate(qformer.layers) if layer.cross_attn is not None])

# %% [markdown]
# ## 4. Building one layer by hand
#
# ### Embeddings
#
# The queries are used as they are (expanded over the batch, no position embedding); the text gets
# word + position embeddings, positions counting from 0 at the first text token. One LayerNorm
# then normalises every position of `[queries; text]`.

# %%
queries = qformer.query_tokens.expand(batch_size, -1, -1)
positions = torch.arange(text_len)
text_embeddings = qformer.word_embeddings(input_ids) + qformer.position_embeddings(positions)
hidden = qformer.embed_norm(torch.cat([queries, text_embeddings], dim=1))
print("queries", list(queries.shape), "+ text", list(text_embeddings.shape), "-> hidden", list(hidden.shape))

torch.testing.assert_close(hidden, qformer.embed(input_ids, batch_size, use_queries=True))

# %% [markdown]
# ### Self-attention over `[queries; text]`
#
# Standard multi-head attention, written out. The mask is a boolean `[B, L, L]` tensor
# (True = may attend), here the bidirectional ITM mask: every position sees every non-padded
# position. BERT is post-LN: the residual is added *before* the LayerNorm.

# %%
layer = qformer.layers[0]
self_mask = attention_mask("itm", num_queries, text_mask)
self_attn = layer.self_attn
head_dim = config.hidden_size // self_attn.num_heads


def split_heads(x, num_heads):
    """[B, n, H] -> [B, heads, n, H / heads]"""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


q = split_heads(self_attn.query(hidden), self_attn.num_heads)
k = split_heads(self_attn.key(hidden), self_attn.num_heads)
v = split_heads(self_attn.value(hidden), self_attn.num_heads)
scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
scores = scores.masked_fill(~self_mask[:, None], float("-inf"))  # same mask for every head
weights = scores.softmax(dim=-1)
context = (weights @ v).transpose(1, 2).flatten(2)  # heads concatenated again
after_self_attn = self_attn.norm(hidden + self_attn.out(context))

print("self_mask      ", list(self_mask.shape))
print("q, k, v        ", list(q.shape))
print("weights        ", list(weights.shape))
print("context        ", list(context.shape))
print("after_self_attn", list(after_self_attn.shape))
print("weight on the two padding tokens of caption 1:", weights[1, :, :, -2:].abs().max().item())

expected, _ = self_attn(hidden, self_attn.keys_values(hidden), self_mask)
torch.testing.assert_close(after_self_attn, expected)

# %% [markdown]
# ### Cross-attention, for the query slice only
#
# Cross-attention is the same computation with keys and values taken from another sequence.
# We package the lines above as a function with a separate `source`, check that it reproduces
# the self-attention, and run it with the image features as source. There is no mask: every query
# sees every image token. The key and value projections map the image width (48 here, 1408 in
# BLIP-2) to the hidden width.

# %%
def attention(block, x, source, mask=None):
    """BERT attention: queries from `x`, keys and values from `source`; residual + LayerNorm on `x`."""
    q = split_heads(block.query(x), block.num_heads)
    k = split_heads(block.key(source), block.num_heads)
    v = split_heads(block.value(source), block.num_heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    context = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
    return block.norm(x + block.out(context))


torch.testing.assert_close(attention(self_attn, hidden, hidden, self_mask), after_self_attn)

query_slice, text_slice = after_self_attn[:, :num_queries], after_self_attn[:, num_queries:]
after_cross_attn = attention(layer.cross_attn, query_slice, image_embeds)
print("key projection weight", list(layer.cross_attn.key.weight.shape), "(hidden x image width)")
print("query slice", list(query_slice.shape), "x image", list(image_embeds.shape), "->", list(after_cross_attn.shape))
print("text slice ", list(text_slice.shape), "skips cross-attention")

# %% [markdown]
# ### The two feed-forwards
#
# Linear to the intermediate width, GELU, linear back, residual, LayerNorm: the same recipe with
# separate weights for the query slice and the text slice.

# %%
def feed_forward(ffn, x):
    return ffn.norm(x + ffn.fc2(F.gelu(ffn.fc1(x))))


query_out = feed_forward(layer.query_ffn, after_cross_attn)
text_out = feed_forward(layer.text_ffn, text_slice)
layer_by_hand = torch.cat([query_out, text_out], dim=1)
print("query FFN", list(query_out.shape), "+ text FFN", list(text_out.shape), "->", list(layer_by_hand.shape))

# The package's layer takes the image's keys and values, not the image: the Q-Former projects them
# once per pass (`QFormer.image_keys_values`), and passes over the same images can share them.
layer_output, *_ = layer(hidden, num_queries, self_mask, layer.cross_attn.keys_values(image_embeds))
torch.testing.assert_close(layer_by_hand, layer_output)

# %% [markdown]
# ### The whole stack
#
# A layer without cross-attention simply skips that step. Looping the hand-built layer over all
# four layers, starting from the hand-built embeddings, gives `QFormer.forward`.

# %%
def qformer_layer(layer, x, num_queries, self_mask, image_embeds):
    x = attention(layer.self_attn, x, x, self_mask)
    queries, text = x[:, :num_queries], x[:, num_queries:]
    if layer.cross_attn is not None:
        queries = attention(layer.cross_attn, queries, image_embeds)
    return torch.cat([feed_forward(layer.query_ffn, queries), feed_forward(layer.text_ffn, text)], dim=1)


stack_by_hand = hidden
for layer in qformer.layers:
    stack_by_hand = qformer_layer(layer, stack_by_hand, num_queries, self_mask, image_embeds)

output = qformer(input_ids, text_mask, image_embeds, mask="itm")
print("last_hidden_state", list(output.last_hidden_state.shape))
print("query_output     ", list(output.query_output.shape))
print("text_output      ", list(output.text_output.shape))
torch.testing.assert_close(stack_by_hand, output.last_hidden_state)

# %% [markdown]
# ## 5. Four uses of one module
#
# Stage 1 trains the Q-Former with three objectives, and they differ only in what runs and in the
# self-attention mask:
#
# | use | call | mask |
# |---|---|---|
# | image pass (ITC image side; all of stage 2) | `qformer(image_embeds=img)` | no text: queries see queries |
# | text alone (ITC text side) | `qformer(ids, m, use_queries=False)` | no queries: text sees text |
# | ITM, joint | `qformer(ids, m, img, mask="itm")` | everything sees everything |
# | ITG, joint | `qformer(ids, m, query_past=image_pass.query_past, mask="itg")` | text sees queries and earlier text |
#
# The masks of chapter 1, for caption 1 (the padded one):

# %%
fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
for ax, kind in zip(axes, ("itc", "itm", "itg")):
    draw_mask(attention_mask(kind, num_queries, text_mask)[1], num_queries, kind.upper(), ax=ax)
fig.tight_layout()
plt.show()

# %%
image_pass = qformer(image_embeds=image_embeds)
text_pass = qformer(input_ids, text_mask, use_queries=False)
itm_pass = qformer(input_ids, text_mask, image_embeds, mask="itm")
itg_pass = qformer(input_ids, text_mask, query_past=image_pass.query_past, mask="itg")

for name, out in [("image pass", image_pass), ("text alone", text_pass), ("ITM", itm_pass), ("ITG", itg_pass)]:
    print(f"{name:10}  queries {list(out.query_output.shape)}   text {list(out.text_output.shape)}")
past_keys, past_values = image_pass.query_past[0]
print(f"query_past: {len(image_pass.query_past)} layers of (keys, values), each {list(past_keys.shape)}")

# %% [markdown]
# **ITC needs no joint pass.** Under the unimodal mask queries and text never see each other, so a
# joint pass computes exactly what two separate passes compute. LAVIS runs ITC as the two
# separate passes, which skip the attention scores that the mask would throw away.

# %%
itc_joint = qformer(input_ids, text_mask, image_embeds, mask="itc")
torch.testing.assert_close(itc_joint.query_output, image_pass.query_output)
torch.testing.assert_close(itc_joint.text_output, text_pass.text_output)

# %% [markdown]
# **ITG can reuse the image pass.** Under the causal mask the queries never see the text, so their
# keys and values in every layer are exactly those of the image pass. `query_past` stores them,
# and the ITG pass runs only the text positions, attending to the cached query keys/values.
# The text never needs the image features directly: everything it learns about the image
# flows through the queries.

# %%
itg_joint = qformer(input_ids, text_mask, image_embeds, mask="itg")
torch.testing.assert_close(itg_joint.query_output, image_pass.query_output)
torch.testing.assert_close(itg_joint.text_output, itg_pass.text_output)

# %% [markdown]
# **ITM really is joint.** With the bidirectional mask the queries see the caption, so their
# outputs change: this is what lets the ITM head judge whether image and text match.

# %%
assert not torch.allclose(itm_pass.query_output, image_pass.query_output, atol=1e-3)
change = (itm_pass.query_output - image_pass.query_output).abs().max()
print(f"largest change of a query output caused by the text: {change:.3f}")

# %% [markdown]
# ## 6. Where the parameters are
#
# Now the full-size Q-Former again, still on the meta device. We group its parameters by role and
# check each group against its closed form (a `Linear(a, b)` has `a*b + b` parameters, a
# `LayerNorm(n)` has `2n`).

# %%
def linear(fan_in, fan_out):
    """Parameters of nn.Linear(fan_in, fan_out): weight and bias."""
    return fan_in * fan_out + fan_out


layers = full_qformer.layers
groups = {
    "self-attention": sum(count_parameters(layer.self_attn) for layer in layers),
    "cross-attention": sum(count_parameters(layer.cross_attn) for layer in layers if layer.cross_attn is not None),
    "query FFN": sum(count_parameters(layer.query_ffn) for layer in layers),
    "text FFN": sum(count_parameters(layer.text_ffn) for layer in layers),
    "word + position embeddings": (
        count_parameters(full_qformer.word_embeddings) + count_parameters(full_qformer.position_embeddings)
    ),
    "embedding LayerNorm": count_parameters(full_qformer.embed_norm),
    "queries": full_qformer.query_tokens.numel(),
}
total = count_parameters(full_qformer)
assert sum(groups.values()) == total

H, W, I, V = full_config.hidden_size, full_config.encoder_width, full_config.intermediate_size, full_config.vocab_size
num_layers, num_cross = full_config.num_layers, full_config.num_layers // full_config.cross_attention_freq
assert groups["self-attention"] == num_layers * (4 * linear(H, H) + 2 * H)
assert groups["cross-attention"] == num_cross * (2 * linear(H, H) + 2 * linear(W, H) + 2 * H)
assert groups["query FFN"] == groups["text FFN"] == num_layers * (linear(H, I) + linear(I, H) + 2 * H)
assert groups["word + position embeddings"] == (V + full_config.max_position_embeddings) * H
assert groups["queries"] == full_config.num_query_tokens * H

for name, n in groups.items():
    print(f"{name:27} {n / 1e6:8.3f}M  {100 * n / total:5.1f}%")
print(f"{'Q-Former total':27} {total / 1e6:8.3f}M")

fig, ax = plt.subplots(figsize=(7.5, 3.2))
bars = ax.barh(list(groups), [n / 1e6 for n in groups.values()], color="#8c96c6")
ax.bar_label(bars, [f"{n / 1e6:.2f}M" if n >= 10**5 else f"{n:,}" for n in groups.values()], padding=3, fontsize=8)
ax.set_xlim(0, 65)
ax.invert_yaxis()
ax.set_xlabel("parameters (millions)")
ax.set_title(f"Full-size Q-Former: {total / 1e6:.2f}M parameters")
fig.tight_layout()
plt.show()

# %% [markdown]
# The two feed-forward copies are 61% of the model; cross-attention, the only part that touches
# the image, is 11%.
#
# **Relating this to the paper's "188M".** The paper reports 188M trainable parameters for the
# Q-Former in stage 1, where it carries its text side and the stage-1 heads. Those heads
# live in `Blip2Stage1`: the vision LayerNorm applied to the frozen features, the two 768 -> 256
# projections for ITC, the ITM head, the ITG language-model head (its vocabulary projection is
# tied to the word embeddings, so only its transform and bias are new), and the temperature.

# %%
dec_token_id = full_config.vocab_size - 1  # [DEC], the token appended to BERT's vocabulary
with torch.device("meta"):
    stage1 = Blip2Stage1(full_config, dec_token_id)
heads = {name: count_parameters(module) for name, module in stage1.named_children() if name != "qformer"}
heads["temp"] = stage1.temp.numel()
for name, n in heads.items():
    print(f"{name:11} {n:>9,}")
stage1_total = count_parameters(stage1)
print(
    f"stage-1 trainable parameters: {stage1_total / 1e6:.2f}M "
    f"(Q-Former {total / 1e6:.2f}M + heads {sum(heads.values()) / 1e6:.2f}M)"
)

# %% [markdown]
# The other published counts are different cuts of the same parameters (numbers from
# transformers' BLIP-2 configs, built on the meta device):
#
# * transformers' captioning Q-Former, **105.14M**: in stage 2 the Q-Former runs queries only, so
#   the captioning checkpoints drop the text side (text FFNs, word and position embeddings) and
#   store the queries separately (+0.025M).
# * transformers' retrieval model minus its vision tower, **186.08M**: the Q-Former with its text
#   side, the two ITC projections and the ITM head, but no ITG head (and the vision LayerNorm is
#   counted with the vision tower there).

# %%
captioning_qformer = total - groups["text FFN"] - groups["word + position embeddings"] - groups["queries"]
retrieval_non_vision = total + heads["vision_proj"] + heads["text_proj"] + heads["itm_head"]
print(f"captioning Q-Former (no text side, no queries): {captioning_qformer / 1e6:.2f}M")
print(f"retrieval model without vision tower:           {retrieval_non_vision / 1e6:.2f}M")
print(f"blip2_lite stage 1 (Q-Former + all heads):      {stage1_total / 1e6:.2f}M   paper: 188M")
assert round(captioning_qformer / 1e6, 2) == 105.14
assert round(retrieval_non_vision / 1e6, 2) == 186.08

# %% [markdown]
# Both published layouts are reproduced to the reported precision, so the package's layers have exactly
# BERT-base's shapes plus BLIP-2's additions. The paper's round "188M" is 1.3M (0.7%) above
# our complete stage-1 count of 186.71M; the paper does not itemise its figure, so we cannot say
# which extra parameters it includes. The order of magnitude is the point: the trainable bridge
# is about a fifth of the frozen ViT-g (986M) and a small fraction of the LLM.
#
# ## 7. Looking at attention weights
#
# With `output_attentions=True` the Q-Former computes attention explicitly (not through PyTorch's
# fused kernel) and returns the weights: one self-attention tensor `[B, heads, L, L_keys]` per
# layer, and one cross-attention tensor `[B, heads, Q, N]` per cross-attention layer. The output
# itself is unchanged.

# %%
itg_with_weights = qformer(input_ids, text_mask, image_embeds, mask="itg", output_attentions=True)
print("self_attentions ", len(itg_with_weights.self_attentions), "x", list(itg_with_weights.self_attentions[0].shape))
print("cross_attentions", len(itg_with_weights.cross_attentions), "x", list(itg_with_weights.cross_attentions[0].shape))
torch.testing.assert_close(itg_with_weights.last_hidden_state, itg_joint.last_hidden_state)

self_weights = itg_with_weights.self_attentions[0]
torch.testing.assert_close(self_weights.sum(dim=-1), torch.ones(self_weights.shape[:-1]))
assert (self_weights[:, :, :num_queries, num_queries:] == 0).all()  # under ITG, queries never see text

# %% [markdown]
# Averaged over heads, layer 0 of caption 1: the self-attention weights show the ITG mask's shape
# (white = exactly zero), and the cross-attention weights show how each query spreads over the
# 10 image tokens. With random weights the spread is nearly uniform (note the colour scale: every
# weight is close to 1/10); a trained Q-Former's queries specialise.

# %%
fig, (ax_self, ax_cross) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [14, 11]})
mean_self_weights = self_weights[1].mean(dim=0)
mean_cross_weights = itg_with_weights.cross_attentions[0][1].mean(dim=0)
fig.colorbar(ax_self.imshow(mean_self_weights, cmap="Purples"), ax=ax_self, shrink=0.8)
ax_self.set_title("self-attention, layer 0 (ITG)")
ax_self.set_xlabel(f"attended position ({num_queries} queries, then text)")
ax_self.set_ylabel("attending position")
fig.colorbar(ax_cross.imshow(mean_cross_weights, cmap="Blues"), ax=ax_cross, shrink=0.8)
ax_cross.set_title("cross-attention, layer 0")
ax_cross.set_xlabel("image token")
ax_cross.set_ylabel("query")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# * One Q-Former layer is BERT's layer with two additions: cross-attention from the query slice to
#   the frozen image features (every 2nd layer) and a second feed-forward for the query slice.
#   We rebuilt it from plain tensor operations and matched the package to float precision.
# * Whatever the image resolution, the output is 32 x 768 per image: the bottleneck the LLM reads.
# * One module, four uses: only the inputs and the self-attention mask change. ITC's joint pass
#   equals two separate passes, and ITG can reuse the queries' keys/values from the image pass.
# * The full-size Q-Former has 185.68M parameters (186.71M with the stage-1 heads), most of them
#   in the two feed-forward copies; the paper rounds its count to 188M.
