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
# # Chapter 1 — Who may look at whom: the three attention masks of stage 1
#
# BLIP-2 (Li et al., 2023) connects a frozen image encoder to a frozen language model through a
# small transformer, the **Q-Former**. In the first training stage the Q-Former learns three
# objectives at once, and the surprising part of Section 3.1 is how little distinguishes them:
# one set of weights, one input layout, and **three different self-attention masks**.
#
# This chapter builds those masks by hand, draws them, proves their properties with asserts, and
# then checks on the package's Q-Former that each mask really does what the paper relies on it for.

# %%
import matplotlib.pyplot as plt
import torch

from blip2_lite import QFormer, QFormerConfig
from blip2_lite.masks import draw_mask, itc_mask, itg_mask, itm_mask

torch.manual_seed(0)
print("torch", torch.__version__)

# %% [markdown]
# ## 1. What the paper says
#
# The Q-Former is a BERT whose input is the concatenation `[queries; text]`: a fixed number of
# learned query embeddings followed by the caption's word embeddings. Only the queries
# cross-attend to the frozen image features; the text never sees the image directly. Queries and
# text share the self-attention layers, so **the self-attention mask alone decides how much image
# information reaches the text, and how much text reaches the queries** (paper, Figure 2):
#
# * **ITC, image-text contrastive — unimodal mask.** Queries see only queries, text sees only
#   text. The loss compares an image embedding (the query outputs) with a text embedding (the
#   `[CLS]` output) and asks matching pairs to be the most similar in the batch. If either side
#   could peek at the other, the model could solve the task by copying instead of by learning two
#   embeddings that are comparable on their own; at retrieval time, when every image must be
#   compared against every text, the two embeddings must be computable separately anyway.
# * **ITM, image-text matching — bidirectional mask.** Everything sees everything. ITM is a binary
#   classifier "does this caption describe this image?", applied to the query outputs; to answer
#   it, the queries must fuse both modalities, so they attend to the text and the text to them.
# * **ITG, image-grounded text generation — multimodal causal mask.** Text token *t* sees all
#   queries and the text tokens up to and including *t* (causal, as in any language model). The
#   queries see only each other, never the text. Since the text cannot look at the image, every
#   piece of information needed to generate the caption has to be **extracted from the image by
#   the queries**; and because the queries cannot read the caption, they cannot simply pass the
#   answer along. This is exactly the skill stage 2 needs, when the query outputs become the only
#   view a frozen language model gets of the image.

# %% [markdown]
# ## 2. Building the masks
#
# Convention for the whole chapter: a mask is a boolean tensor `[batch, L, L]` with
# `L = num_queries + text_len`; `mask[b, i, j]` is True when position `i` (a row, the one
# attending) may attend to position `j` (a column, the one attended). Queries come first.
#
# A small example: 4 queries and the caption "a red circle", tokenised as `[CLS] a red circle`
# and right-padded to 6 tokens, as a batch of captions would be.

# %%
num_queries = 4
tokens = ["q0", "q1", "q2", "q3", "[CLS]", "a", "red", "circle", "[PAD]", "[PAD]"]
text_attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # 1 = real token, 0 = padding
text_len = text_attention_mask.shape[1]

# %% [markdown]
# Each mask is the product of two independent decisions: a **pattern** that depends only on the
# objective (which kinds of positions may see which), and the **padding**, which depends only on
# the batch. We build the patterns first, on `[L, L]`.
#
# ITM's pattern is trivial: everyone may look at everyone.

# %%
def bidirectional_pattern(num_queries, text_len):
    length = num_queries + text_len
    return torch.ones(length, length, dtype=torch.bool)


# %% [markdown]
# ITC's pattern is block diagonal: position `i` may see position `j` exactly when both are queries
# or both are text.

# %%
def unimodal_pattern(num_queries, text_len):
    is_query = torch.arange(num_queries + text_len) < num_queries
    return is_query[:, None] == is_query[None, :]


# %% [markdown]
# ITG's pattern: every row may see the query columns. Query rows see nothing else; text rows also
# see the text columns up to and including themselves. "Up to themselves" is the lower triangle of
# the full `[L, L]` grid, which on the text block is the usual causal mask.

# %%
def multimodal_causal_pattern(num_queries, text_len):
    length = num_queries + text_len
    is_query = torch.arange(length) < num_queries
    row_is_text, column_is_query = ~is_query[:, None], is_query[None, :]
    column_not_later = torch.ones(length, length, dtype=torch.bool).tril()
    return column_is_query | (row_is_text & column_not_later)


print(multimodal_causal_pattern(num_queries, text_len).int())

# %% [markdown]
# ### Padding
#
# A padded token carries no information, so **no position may attend to it**: we switch off its
# *column* in every row. Its own *row* we leave alone. That may look untidy (a `[PAD]` row still
# attends to real tokens and produces an output), but it is necessary: a row with every key
# masked turns into a softmax over nothing but $-\infty$, which is `NaN`:

# %%
print(torch.softmax(torch.full((3,), float("-inf")), dim=0))

# %% [markdown]
# and that `NaN` would not stay put. In the next layer every position multiplies its attention
# weights with the values of all positions, including the padded one, and `0 * NaN` is still
# `NaN`. The outputs of padded rows are harmless junk that every loss ignores; a `NaN` would
# poison the whole sequence.
#
# So padding removes columns. The keys that exist are all queries and the real text tokens:

# %%
def real_keys(num_queries, text_attention_mask):
    """[B, L]: True for every query and every non-padded text token."""
    all_queries = torch.ones(text_attention_mask.shape[0], num_queries, dtype=torch.bool)
    return torch.cat([all_queries, text_attention_mask.bool()], dim=1)


def with_padding(pattern, num_queries, text_attention_mask):
    """Broadcast the [L, L] pattern over the batch and switch off the padded columns."""
    return pattern[None] & real_keys(num_queries, text_attention_mask)[:, None, :]


print(real_keys(num_queries, text_attention_mask).int())

# %% [markdown]
# The three masks of stage 1, for any batch:

# %%
PATTERNS = {"itc": unimodal_pattern, "itm": bidirectional_pattern, "itg": multimodal_causal_pattern}


def stage1_mask(kind, num_queries, text_attention_mask):
    pattern = PATTERNS[kind](num_queries, text_attention_mask.shape[1])
    return with_padding(pattern, num_queries, text_attention_mask)


masks = {kind: stage1_mask(kind, num_queries, text_attention_mask) for kind in PATTERNS}

# %% [markdown]
# ## 3. The picture
#
# Drawn like the paper's Figure 2: rows attend, columns are attended; dark = may attend,
# light = masked; the black lines separate queries from text. In ITG the first text token is
# `[DEC]` instead of `[CLS]`: the paper signals the generation task with its own start token.

# %%
titles = {
    "itc": "ITC: uni-modal",
    "itm": "ITM: bi-directional",
    "itg": "ITG: multi-modal causal",
}
itg_tokens = [token if token != "[CLS]" else "[DEC]" for token in tokens]
fig, axes = plt.subplots(1, 3, figsize=(11, 4))
for ax, kind in zip(axes, PATTERNS):
    draw_mask(masks[kind], num_queries, title=titles[kind], ax=ax, tokens=itg_tokens if kind == "itg" else tokens)
fig.tight_layout()
plt.show()

# %% [markdown]
# Read the ITG panel row by row: `q0`–`q3` see the query block and nothing else; `[DEC]` sees the
# queries and itself; `circle` sees the queries, `[DEC] a red` and itself. The two `[PAD]`
# columns are light in every panel, while the `[PAD]` rows still see something.

# %% [markdown]
# ## 4. Checking the claims
#
# First, these hand-built masks are the package's masks, for many random batches: different
# numbers of queries, text lengths and amounts of padding (each caption keeps at least its
# `[CLS]`).

# %%
def random_text_attention_mask(batch, text_len):
    real_lengths = torch.randint(1, text_len + 1, (batch, 1))
    return (torch.arange(text_len)[None] < real_lengths).long()


package_masks = {"itc": itc_mask, "itm": itm_mask, "itg": itg_mask}
random_cases = []
for _ in range(50):
    case_queries = int(torch.randint(1, 9, ()))
    case_text_mask = random_text_attention_mask(batch=3, text_len=int(torch.randint(1, 13, ())))
    random_cases.append((case_queries, case_text_mask))
    for kind, package_mask in package_masks.items():
        assert torch.equal(stage1_mask(kind, case_queries, case_text_mask), package_mask(case_queries, case_text_mask))

# %% [markdown]
# Now the properties the paper relies on, checked on the package's masks over the same random
# cases. For each case we cut the mask into its query/text blocks.
#
# * ITC: no query row sees a text column, no text row sees a query column.
# * ITM: every real key is visible from every row.
# * ITG: no query row sees text; no text row sees a later text column; every text row sees all
#   queries.
# * All three: padded columns are never attended, and every row has at least one allowed key.
#   (With at least one query that holds by construction: queries always see queries, and text
#   rows see the queries (ITM, ITG) or the caption's `[CLS]` (ITC).)

# %%
for case_queries, case_text_mask in random_cases:
    q, case_text_len = case_queries, case_text_mask.shape[1]
    every_real_key = real_keys(q, case_text_mask)[:, None, :].expand(-1, q + case_text_len, -1)
    text_is_padding = ~case_text_mask.bool()

    itc = itc_mask(q, case_text_mask)
    assert not itc[:, :q, q:].any() and not itc[:, q:, :q].any()

    itm = itm_mask(q, case_text_mask)
    assert torch.equal(itm, every_real_key)

    itg = itg_mask(q, case_text_mask)
    later_text = torch.ones(case_text_len, case_text_len, dtype=torch.bool).triu(diagonal=1)
    assert not itg[:, :q, q:].any()
    assert not (itg[:, q:, q:] & later_text).any()
    assert itg[:, q:, :q].all()

    for mask in (itc, itm, itg):
        assert not (mask[:, :, q:] & text_is_padding[:, None, :]).any()
        assert mask.any(dim=-1).all()

# %% [markdown]
# ## 5. The masks at work inside the Q-Former
#
# A mask is only a promise; the model keeps it only if nothing else in the network mixes
# positions. In the Q-Former, the feed-forward layers and LayerNorms act on each position
# separately, and cross-attention runs from the queries to the image, so self-attention is the
# only place where positions meet. The following experiments check that on a tiny, randomly
# initialised Q-Former (in `eval()` mode, so dropout does not add noise). Random image features
# stand in for the frozen encoder's output.

# %%
config = QFormerConfig.small(hidden_size=32, num_layers=2, intermediate_size=64, encoder_width=24, num_query_tokens=4)
qformer = QFormer(config).eval()

image = torch.randn(1, 9, config.encoder_width)  # 9 "patches"
input_ids = torch.tensor([[1, 17, 42, 8, 0, 0]])  # "[CLS] a red circle [PAD] [PAD]", 0 = pad
assert input_ids.shape == text_attention_mask.shape  # the padding of section 2

# %% [markdown]
# **ITG is causal.** Replace the text from position 2 on (`red circle` becomes two other words).
# Under the ITG mask the queries and the outputs at positions 0 and 1 must not move, while those
# from position 2 on must.

# %%
changed_from, num_real_tokens = 2, int(text_attention_mask.sum())
other_ids = input_ids.clone()
other_ids[0, changed_from:num_real_tokens] = torch.tensor([55, 73])

with torch.no_grad():
    itg_original = qformer(input_ids, text_attention_mask, image_embeds=image, mask="itg")
    itg_changed = qformer(other_ids, text_attention_mask, image_embeds=image, mask="itg")

torch.testing.assert_close(itg_changed.query_output, itg_original.query_output)
torch.testing.assert_close(
    itg_changed.text_output[:, :changed_from], itg_original.text_output[:, :changed_from]
)
assert not torch.allclose(
    itg_changed.text_output[:, changed_from:num_real_tokens], itg_original.text_output[:, changed_from:num_real_tokens]
)

# %% [markdown]
# As a control, the same change under the bidirectional ITM mask reaches every position,
# queries included: the test above would have caught a mask that leaked.

# %%
with torch.no_grad():
    itm_original = qformer(input_ids, text_attention_mask, image_embeds=image, mask="itm")
    itm_changed = qformer(other_ids, text_attention_mask, image_embeds=image, mask="itm")

assert not torch.allclose(itm_changed.query_output, itm_original.query_output)
assert not torch.allclose(itm_changed.text_output[:, :changed_from], itm_original.text_output[:, :changed_from])

# %% [markdown]
# **ITC keeps the modalities apart.** Under the unimodal mask the query outputs depend only on the
# image, and the text outputs only on the text: a completely different caption (with different
# padding) leaves the queries alone, a different image leaves the text alone.

# %%
unrelated_ids = torch.tensor([[1, 91, 3, 0, 0, 0]])
unrelated_text_mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
other_image = torch.randn(1, 9, config.encoder_width)

with torch.no_grad():
    itc_original = qformer(input_ids, text_attention_mask, image_embeds=image, mask="itc")
    itc_other_text = qformer(unrelated_ids, unrelated_text_mask, image_embeds=image, mask="itc")
    itc_other_image = qformer(input_ids, text_attention_mask, image_embeds=other_image, mask="itc")

torch.testing.assert_close(itc_other_text.query_output, itc_original.query_output)
torch.testing.assert_close(itc_other_image.text_output, itc_original.text_output)
assert not torch.allclose(itc_other_image.query_output, itc_original.query_output)

# %% [markdown]
# This is what lets the official implementation (LAVIS) skip the ITC mask altogether: it runs
# two separate passes, the queries with the image and the text alone, which compute the same thing.

# %%
with torch.no_grad():
    queries_alone = qformer(image_embeds=image)
    text_alone = qformer(input_ids, text_attention_mask, use_queries=False)

torch.testing.assert_close(queries_alone.query_output, itc_original.query_output)
torch.testing.assert_close(text_alone.text_output, itc_original.text_output)

# %% [markdown]
# **Padding is invisible.** Whatever token ids sit in the padded slots, no real position's output
# changes, under any of the three masks.

# %%
garbage_in_padding = input_ids.clone()
garbage_in_padding[0, 4:] = torch.tensor([64, 29])
is_real = real_keys(config.num_query_tokens, text_attention_mask)[0]

for kind in PATTERNS:
    with torch.no_grad():
        clean = qformer(input_ids, text_attention_mask, image_embeds=image, mask=kind)
        dirty = qformer(garbage_in_padding, text_attention_mask, image_embeds=image, mask=kind)
    torch.testing.assert_close(dirty.last_hidden_state[:, is_real], clean.last_hidden_state[:, is_real])

# %% [markdown]
# ## Summary
#
# | objective | mask | queries see | text token *t* sees | why |
# |---|---|---|---|---|
# | ITC (contrastive) | unimodal | queries | all text | two independent embeddings, nothing leaks between image and text |
# | ITM (matching) | bidirectional | queries and text | queries and all text | the query outputs must fuse both modalities to judge the pair |
# | ITG (generation) | multimodal causal | queries | queries and text ≤ *t* | the text can only learn about the image through the queries, so the queries must extract it |
#
# In all three, padded text tokens are masked as keys (columns) but keep valid rows, so that no
# softmax runs over an empty set.
