# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 5 — Stage 2, the bridge: soft visual prompts for a frozen LLM
#
# After stage 1 (chapters 3 and 4) the Q-Former's 32 queries have learned to pull out of a frozen
# image encoder what text can say about an image. Stage 2 hands those query outputs to a **frozen
# large language model**. The trick is almost embarrassingly simple: a single Linear layer maps
# each query output (768 wide) to the LLM's word-embedding width, and the results are placed in
# front of the LLM's input embeddings, as if they were the embeddings of 32 extra words. The paper
# calls them **soft visual prompts**. The LLM, which has never seen an image, then continues the
# text.
#
# Nothing of the LLM is trained. Only the Q-Former and the projection learn, from the LLM's own
# language-modelling loss on captions. Two LLM families need two losses:
#
# * **decoder-only** (OPT): `[soft prompt; text]`, next-token loss on the text only;
# * **encoder-decoder** (FlanT5): `[soft prompt; prefix]` into the encoder, the rest of the
#   caption as the decoder's target (prefix language modelling).
#
# This chapter:
#
# 1. builds the soft prompt and the decoder-only loss by hand and checks the package against it;
# 2. does the same for the encoder-decoder prefix-LM;
# 3. shows that the full-size Salesforce models load into the same code (parameter table);
# 4. runs the real BLIP-2 when a GPU and the Hugging Face hub are available.
#
# Chapter 6 then trains stage 2 in the lite world, with two small frozen LLMs that have only ever
# read text.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch

from blip2_lite.qformer import QFormer, QFormerConfig
from blip2_lite.llm_inputs import IGNORE_INDEX, language_batch, split_for_prefix_lm
from blip2_lite.stage2 import Blip2

torch.manual_seed(0)

# %% [markdown]
# ## 1. The soft visual prompt, by hand
#
# A toy setup keeps every tensor printable: a Q-Former with 4 queries over 10 image tokens, and a
# randomly initialised two-layer OPT from transformers as the "LLM" (the real thing is the same
# class with more layers). The text side uses a word-level tokenizer: token `wN` has id N.

# %%
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

vocab = {"<pad>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, 50)}
word_level = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
toy_tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>")

toy_llm = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, ffn_dim=48,
                                   num_attention_heads=2, word_embed_proj_dim=24, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=1))
toy_qformer = QFormer(QFormerConfig.small(hidden_size=32, num_layers=2, intermediate_size=64, encoder_width=16,
                                          num_query_tokens=4, vocab_size=30, max_position_embeddings=16,
                                          text_input=False))
toy = Blip2(toy_qformer, toy_llm, toy_tokenizer).eval()
image_features = torch.randn(2, 10, 16)  # 2 images, 10 frozen image tokens of width 16

# %% [markdown]
# Step by step, with the shape after each step:

# %%
image_embeds = toy.ln_vision(image_features)  # the vision LayerNorm of stage 1
query_output = toy.qformer(image_embeds=image_embeds).query_output  # the queries read the image
soft_prompt = toy.language_projection(query_output)  # Linear: Q-Former width -> LLM width
print("image features     ", list(image_features.shape), " (images, image tokens, encoder width)")
print("query outputs      ", list(query_output.shape), "  (images, queries, Q-Former width)")
print("soft visual prompt ", list(soft_prompt.shape), "  (images, queries, LLM embedding width)")

batch = language_batch(toy_tokenizer, prompts=["w5 w6", "w7"], targets=["w8 w9 w10", "w11"], encoder_decoder=False)
text_embeds = toy_llm.get_input_embeddings()(batch.input_ids)
print("prompt + caption   ", list(batch.input_ids.shape), "     (images, text tokens)")
print("text embeddings    ", list(text_embeds.shape))

inputs_embeds = torch.cat([soft_prompt, text_embeds], dim=1)  # the soft prompt goes first
attention_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), batch.attention_mask], dim=1)
labels = torch.cat([torch.full((2, 4), IGNORE_INDEX), batch.labels], dim=1)
print("LLM input          ", list(inputs_embeds.shape), " (images, queries + text, LLM width)")
print("labels\n", labels)

# %% [markdown]
# The labels say where the loss is: -100 (no loss) on the 4 soft-prompt positions, on the prompt
# text and on padding; the caption's ids and the end-of-sequence token (`</s>`, id 1) elsewhere. The
# LLM shifts them itself (position t predicts token t+1), so the last soft-prompt position
# predicts the first word of the caption: that is where the image has to speak.
#
# A picture of the same batch, one row per image:

# %%
def draw_layout(labels, attention_mask, num_soft, ax, title):
    """Colour each position of the LLM's input by its role."""
    roles = np.zeros(labels.shape, dtype=int)  # 0 soft prompt, 1 prompt text, 2 target, 3 padding
    roles[:, num_soft:] = 1
    roles[labels != IGNORE_INDEX] = 2
    roles[attention_mask == 0] = 3
    colours = ["tab:orange", "tab:blue", "tab:green", "lightgrey"]
    ax.imshow(roles, cmap=plt.matplotlib.colors.ListedColormap(colours), vmin=0, vmax=3)
    ax.set(xlabel="position in the LLM's input", ylabel="image", title=title, yticks=range(len(labels)))
    names = ["soft visual prompt (labels -100)", "prompt text (-100)", "target: loss here", "padding (masked, -100)"]
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, names)], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8)


fig, ax = plt.subplots(figsize=(9, 1.8))
draw_layout(labels, attention_mask, 4, ax, "decoder-only LLM (OPT): [soft prompt; prompt; caption]")
plt.show()

# %% [markdown]
# The hand-built loss, and the package's `Blip2.forward`, which does exactly the above:

# %%
with torch.no_grad():
    by_hand = toy_llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
    package = toy(batch.input_ids, batch.attention_mask, labels=batch.labels, image_features=image_features).loss
print(f"by hand {by_hand.item():.6f}   package {package.item():.6f}")
torch.testing.assert_close(package, by_hand)

# %% [markdown]
# Only the bridge learns: after a backward pass the LLM has no gradients at all, the Q-Former and
# the projection do. (The package also keeps the frozen LLM in eval mode while training, so its
# dropout never fires: the LLM is a fixed function of its input.)

# %%
toy.train()
toy(batch.input_ids, batch.attention_mask, labels=batch.labels, image_features=image_features).loss.backward()
assert all(p.grad is None for p in toy.language_model.parameters())
assert toy.language_projection.weight.grad is not None and toy.qformer.query_tokens.grad is not None
assert not toy.language_model.training
print("gradient reaches: projection, Q-Former, ln_vision; the LLM has none")
toy.eval()

# %% [markdown]
# ### Generation with a batch of different prompts
#
# To generate, transformers' `generate` runs on the embeddings (`inputs_embeds`), so greedy search,
# beam search, nucleus sampling and the length and repetition penalties all come from transformers.
# One detail matters for batches: a decoder-only LLM continues every row from the *last* position,
# so prompts of different lengths are padded on the **left**, and the soft prompt goes after the
# padding: `[padding; soft prompt; prompt]`. A batched call then gives exactly what one call per
# image gives:

# %%
prompts = ["w5 w6 w7", "w9"]
batched = toy.generate(image_features=image_features, prompts=prompts, max_new_tokens=5)
one_by_one = [toy.generate(image_features=image_features[i : i + 1], prompts=p, max_new_tokens=5)[0]
              for i, p in enumerate(prompts)]
print(batched)
assert batched == one_by_one

ids, mask = toy.tokenize_prompts(prompts)
_, llm_mask = toy.llm_inputs(toy.soft_prompt(image_features=image_features), ids, mask)
print("attention mask of the LLM input (left padding, then 4 soft-prompt positions):\n", llm_mask)

# %% [markdown]
# ## 2. Encoder-decoder LLMs: prefix language modelling
#
# FlanT5 reads with an encoder and writes with a decoder. BLIP-2 splits each caption at a random
# word: the soft prompt plus the first part (the prefix) go into the encoder, the rest is the
# decoder's target. At test time the prefix is the prompt (or empty), and the decoder writes.

# %%
caption = "a large red circle above a small blue star"
for cut in (0, 3, 6):
    prefix, suffix = split_for_prefix_lm(caption, cut)
    print(f"encoder: [soft prompt] + {prefix!r:32} decoder target: {suffix!r}")

t5_batch = language_batch(toy_tokenizer, prompts=["w5 w6", ""], targets=["w8 w9", "w11 w12 w13"], encoder_decoder=True)
print("encoder ids\n", t5_batch.input_ids, "\ndecoder labels\n", t5_batch.labels)

# %% [markdown]
# With a T5 built the same way, the package's loss is the decoder's cross-entropy over the target,
# with the soft prompt and prefix on the encoder side:

# %%
from transformers import T5Config, T5ForConditionalGeneration

toy_t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                                             feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
toy_flan = Blip2(toy_qformer, toy_t5, toy_tokenizer).eval()
with torch.no_grad():
    soft = toy_flan.soft_prompt(image_features=image_features)
    encoder_embeds = torch.cat([soft, toy_t5.get_input_embeddings()(t5_batch.input_ids)], dim=1)
    encoder_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), t5_batch.attention_mask], dim=1)
    by_hand = toy_t5(inputs_embeds=encoder_embeds, attention_mask=encoder_mask, labels=t5_batch.labels).loss
    package = toy_flan(t5_batch.input_ids, t5_batch.attention_mask, labels=t5_batch.labels,
                       image_features=image_features).loss
print(f"by hand {by_hand.item():.6f}   package {package.item():.6f}")
torch.testing.assert_close(package, by_hand)

# %% [markdown]
# ## 3. The full-size models: the same code, Salesforce's checkpoints
#
# `blip2_lite.convert.pretrained.from_pretrained` loads the Hugging Face layout of every released
# BLIP-2 (`Salesforce/blip2-opt-2.7b`, `-opt-6.7b`, `-flan-t5-xl`, `-flan-t5-xxl`, their `-coco`
# variants, and the retrieval model `blip2-itm-vit-g`) into these modules: the EVA ViT-g as a timm
# model, the Q-Former, the projection, and the LLM as transformers' own OPT or T5. The tests build
# tiny random checkpoints with transformers' `Blip2ForConditionalGeneration` (OPT and T5 flavours),
# load them, and check that logits agree within 1e-5 and that greedy and beam-search outputs are
# token-identical (`tests/test_stage2.py`, `tests/test_convert.py`); the ViT is checked layer by
# layer (`tests/test_eva.py`).
#
# The full-size architectures are built on PyTorch's *meta* device: every tensor has a shape but
# no memory, so a 12-billion-parameter model costs nothing to count.

# %%
from blip2_lite.convert.pretrained import SALESFORCE_TEXT_CONFIGS, blip2_from_config, salesforce_config
from blip2_lite.parameters import millions

print(f"{'checkpoint':30s} {'ViT-g':>8s} {'Q-Former':>9s} {'proj.':>6s} {'LLM':>9s} {'total':>9s} {'trained':>8s}")
sizes = {}
for name in SALESFORCE_TEXT_CONFIGS:
    with torch.device("meta"):
        full = blip2_from_config(salesforce_config(name))
    vision = millions(full.image_encoder) + millions(full.ln_vision)
    trained = millions(full.qformer) + millions(full.language_projection)
    sizes[name] = (vision, millions(full.qformer), millions(full.language_projection), millions(full.language_model),
                   millions(full), trained)
    print(f"{name:30s}" + "".join(f"{v:9.2f}" for v in sizes[name]))

# %% [markdown]
# How these compare with the published figures:
#
# * The paper's Table 1 lists 107M trainable parameters for BLIP-2 OPT-2.7B: the queries-only
#   Q-Former (105.16M, queries included) plus the projection (1.97M) gives exactly that.
# * transformers counts 0.05M more for the ViT: it stores EVA's key bias, which is always zero,
#   as a parameter (39 blocks x 1408); timm keeps it as a constant. The ViT-g is then 985.95M,
#   mmpretrain's figure.
# * mmpretrain reports 3770.47M in total for blip2-opt2.7b, 25.8M more than the 3744.68M of the
#   Hugging Face layout (3744.62M here + 0.05M key biases). The Q-Former's word and position
#   embeddings alone are 23.8M (30523 + 512 rows of 768): stage 2 never uses them, so the stage-2
#   checkpoints drop them, but a model built from the stage-1 code keeps them.
# * The paper's "188M" Q-Former is the stage-1 one with its text side: blip2_lite's retrieval
#   model has 186.7M without the ViT (`tests/test_convert.py`).

# %%
vision, qformer_size, projection, language, total, trained = sizes["Salesforce/blip2-opt-2.7b"]
assert round(trained) == 107
assert round(total + 39 * 1408 / 1e6, 2) == 3744.68
assert round(vision + 39 * 1408 / 1e6, 2) == 985.95

# %% [markdown]
# ## 4. With a GPU and internet: the real BLIP-2
#
# The same API loads Salesforce's weights. This cell runs only when the hub is reachable and a
# GPU is present (CI and the lite world are offline, so it is skipped there).

# %%
import os

if os.environ.get("HF_HUB_OFFLINE") == "1" or not torch.cuda.is_available():
    print("offline or no GPU: skipping Salesforce/blip2-opt-2.7b")
else:
    from PIL import Image
    from skimage import data as skimage_data

    from blip2_lite.convert.pretrained import from_pretrained
    from blip2_lite.families import FAMILIES
    from blip2_lite.prompts import PROMPTS

    blip2 = from_pretrained("Salesforce/blip2-opt-2.7b", dtype=torch.float16, device="cuda")
    photo = Image.fromarray(skimage_data.chelsea())
    print(blip2.generate([photo], PROMPTS["caption"], num_beams=5, max_new_tokens=30))
    vqa_prompt = FAMILIES["opt"].vqa_prompt.format("what animal is this?")  # the paper's OPT template
    print(blip2.generate([photo], vqa_prompt, num_beams=5, length_penalty=-1.0, max_new_tokens=10))

# %% [markdown]
# ## Summary
#
# * The soft visual prompt is `Linear(Q-Former query outputs)`, placed in front of the LLM's word
#   embeddings, with the attention mask extended over it and the loss masked (-100) there.
# * OPT learns from next-token prediction on the caption; FlanT5 from prefix language modelling.
# * Only the Q-Former and the projection learn; the LLM is frozen and may run in fp16/bf16.
# * The same classes load the full-size Salesforce checkpoints, checked against transformers.
#
# The next chapter trains this bridge in the lite world, where the frozen LLMs are small models
# that have only ever read text.
