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
# # Chapter 3 — Stage 1: the three losses
#
# In its first stage BLIP-2 teaches the Q-Former to read a frozen image encoder. The image encoder
# is never trained; only the Q-Former (32 learned queries and a BERT-base) and a few heads are.
# The Q-Former learns from image-caption pairs, with three objectives that share all its weights
# and differ only in the self-attention mask (who may look at whom, chapter 1):
#
# | objective | question it asks | mask |
# |---|---|---|
# | **ITC**, image-text contrastive | which caption in the batch belongs to this image? | unimodal: queries and text never meet |
# | **ITM**, image-text matching | does this caption match this image, yes or no? | bidirectional: everything sees everything |
# | **ITG**, image-grounded text generation | what is the next word of the caption, given the image? | multimodal causal |
#
# The training loss is simply their sum, ITC + ITM + ITG.
#
# Each loss is a short function in `blip2_lite.losses`, taking tensors rather than a model. In this
# notebook we rebuild each one by hand in plain torch, assert that the package computes the same
# numbers, and finally train the whole stage-1 model on one small batch to watch all three fall.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip2_lite import Blip2Stage1, QFormerConfig, losses

torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. ITC: image-text contrastive learning
#
# ITC pulls an image and its caption together in a shared embedding space and pushes them away
# from the other captions and images of the batch. The text side is one vector: the projected,
# L2-normalised output of the caption's `[CLS]` token. The image side is not one vector but
# 32: every query's output, projected and normalised.
#
# How similar are an image and a caption then? BLIP-2 takes the **best-matching query**:
#
# $$ s(I, T) = \max_{i=1..32} \cos(z_i, t), $$
#
# where $z_i$ is query $i$'s embedding of image $I$ and $t$ the caption's `[CLS]` embedding.
# The queries are free to specialise on different aspects of an image (an object, its colour,
# the background), and a caption usually talks about only some of them. The maximum lets the
# caption match the query that speaks about its topic; a mean would dilute that one good match
# with 31 unrelated ones.
#
# To see the difference we make toy features with exactly that structure: 6 images of 32 random
# unit vectors each, and a caption per image that is a noisy copy of *one* of its image's
# query vectors (the one aspect the caption describes).

# %%
batch, num_queries, embed_dim = 6, 32, 16


def random_images(count):
    """`count` images, each 32 random unit query embeddings: [count, num_queries, embed_dim]."""
    return F.normalize(torch.randn(count, num_queries, embed_dim, generator=generator), dim=-1)


def caption_features(images):
    """One caption per image row: a noisy copy of one of its query embeddings, normalised."""
    described_query = torch.randint(num_queries, (len(images),), generator=generator)
    noise = 0.15 * torch.randn(len(images), embed_dim, generator=generator)
    return F.normalize(images[torch.arange(len(images)), described_query] + noise, dim=-1)


image_itc = random_images(batch)  # [B, Q, E]
text_itc = caption_features(image_itc)  # [B, E]

# %% [markdown]
# Both sides are unit vectors, so a dot product is a cosine. One `einsum` gives the cosine of every
# query of every image with every caption; the similarity keeps the best query.

# %%
query_cosines = torch.einsum("iqe,te->itq", image_itc, text_itc)  # [images, texts, queries]
similarity = query_cosines.amax(dim=-1)  # [images, texts]

assert torch.equal(similarity, losses.itc_similarity(image_itc, text_itc))


# %% [markdown]
# With the maximum, every image scores its own caption (the diagonal) above every other caption;
# with the mean over queries, the one matching query drowns among 31 others. The left panel shows
# why: caption 0 meets one query of its image almost exactly, while its cosines with the other
# images' queries are spread around zero.

# %%
def worst_margin(scores):
    """Smallest gap between an image's score for its own caption and for any other caption."""
    others = scores.masked_fill(torch.eye(len(scores), dtype=torch.bool), float("-inf"))
    return (scores.diag() - others.amax(dim=1)).min().item()


mean_similarity = query_cosines.mean(dim=-1)
print(f"worst margin, max over queries:  {worst_margin(similarity):+.2f}")
print(f"worst margin, mean over queries: {worst_margin(mean_similarity):+.2f}")
assert worst_margin(similarity) > 0.1 > 0 > worst_margin(mean_similarity)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
ax = axes[0]
for image in range(batch):
    own = image == 0
    ax.plot(query_cosines[image, 0], "o" if own else ".", color="C3" if own else "grey",
            label="its own image" if own else ("other images" if image == 1 else None))
ax.set(xlabel="query", ylabel="cosine with caption 0", title="caption 0 against every query")
ax.legend(loc="lower right")
for ax, scores, name in ((axes[1], similarity, "max"), (axes[2], mean_similarity, "mean")):
    shown = ax.imshow(scores, cmap="viridis")
    ax.set(xlabel="caption", ylabel="image", title=f"{name} over queries")
    fig.colorbar(shown, ax=ax, fraction=0.046)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The loss
#
# The similarities are divided by a **learnable temperature** $\tau$ (initialised at 0.07) and
# read as logits. Each image is a classification over the batch's captions whose right answer is
# its own caption (image-to-text), and each caption a classification over the images
# (text-to-image). The loss is the average of the two cross-entropies. Two details:
#
# * **Temperature clamp.** $\tau$ is clamped into `losses.TEMPERATURE_RANGE` = (0.001, 0.5) before
#   use, as in the official LAVIS code: the model may sharpen its softmax, but not without limit.
# * **Label smoothing 0.1.** The target is not one-hot but 90% one-hot plus 10% spread uniformly
#   over all candidates. The model is not asked to be infinitely sure, which matters because in
#   real data another caption in the batch can fit an image quite well too.
#
# In general the target of each row is a distribution over the columns: with one caption per image
# it is one-hot (the identity matrix of `positives`); below we will need more than one positive.

# %%
LABEL_SMOOTHING = 0.1


def smoothed_cross_entropy(logits, target_probs, smoothing=LABEL_SMOOTHING):
    """Cross-entropy against (1 - smoothing) * target + smoothing * uniform, averaged over rows."""
    smoothed = (1 - smoothing) * target_probs + smoothing / logits.shape[-1]
    return -(smoothed * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def itc_loss_by_hand(image_itc, text_itc, temperature, positives):
    """Symmetric contrastive loss; `positives[i, t]` says caption t belongs to image i."""
    logits = losses.itc_similarity(image_itc, text_itc) / temperature.clamp(0.001, 0.5)
    targets = positives.float() / positives.sum(dim=1, keepdim=True)  # share the mass among positives
    image_to_text = smoothed_cross_entropy(logits, targets)
    text_to_image = smoothed_cross_entropy(logits.t(), targets.t())
    return (image_to_text + text_to_image) / 2


temperature = torch.tensor(0.07)
one_caption_each = torch.eye(batch, dtype=torch.bool)
loss_by_hand = itc_loss_by_hand(image_itc, text_itc, temperature, one_caption_each)
itc = losses.itc_loss(image_itc, text_itc, temperature)
print(f"ITC loss: by hand {loss_by_hand:.6f}, package {itc.loss:.6f}")

torch.testing.assert_close(itc.loss, loss_by_hand)
assert torch.equal(itc.positives, one_caption_each)
torch.testing.assert_close(itc.sim_i2t, similarity / temperature)
torch.testing.assert_close(itc.sim_t2i, similarity.t() / temperature)
# our smoothing is exactly torch's
targets = torch.arange(batch)
torch.testing.assert_close(
    smoothed_cross_entropy(itc.sim_i2t, F.one_hot(targets, batch).float()),
    F.cross_entropy(itc.sim_i2t, targets, label_smoothing=LABEL_SMOOTHING),
)

# %% [markdown]
# The clamp in action: a temperature above 0.5 behaves exactly like 0.5, one below 0.001 like 0.001.

# %%
assert losses.TEMPERATURE_RANGE == (0.001, 0.5)
for outside, edge in ((5.0, 0.5), (1e-6, 0.001)):
    torch.testing.assert_close(
        losses.itc_loss(image_itc, text_itc, torch.tensor(outside)).loss,
        losses.itc_loss(image_itc, text_itc, torch.tensor(edge)).loss,
    )

# %% [markdown]
# ### Several captions of one image
#
# COCO has five captions per image, so a batch can hold two captions of the same image. Treating the
# other one as a negative would punish the model for being right. With `image_ids`, every caption
# of the same image is a positive, and the target mass of a row is shared among its positives.
# Below, captions 0 and 1 describe image 0, and captions 4 and 5 describe image 3.

# %%
image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
shared_image_itc = random_images(4)[image_ids]  # row i: the image that caption i describes
shared_text_itc = caption_features(shared_image_itc)
same_image = image_ids[:, None] == image_ids[None, :]
print(same_image.int())

shared = losses.itc_loss(shared_image_itc, shared_text_itc, temperature, image_ids=image_ids)
assert torch.equal(shared.positives, same_image)
torch.testing.assert_close(
    shared.loss, itc_loss_by_hand(shared_image_itc, shared_text_itc, temperature, same_image)
)

# %% [markdown]
# ### Batch size 1
#
# With one pair there is nothing to contrast: the only candidate is the positive, the softmax is
# certain, and the loss is exactly 0. (The official code squeezes tensors here and breaks at batch
# size 1; the package keeps the batch dimension.) ITM, below, is a different story.

# %%
single = losses.itc_loss(image_itc[:1], text_itc[:1], temperature)
assert single.sim_i2t.shape == (1, 1)
assert single.loss.item() == 0.0

# %% [markdown]
# ### Across GPUs
#
# A contrastive loss gets harder, and more useful, with more negatives. With $N$ GPUs each holding
# $B$ pairs, every image is therefore compared with all $NB$ captions of the global batch: the
# features are all-gathered, and the positive of local row $i$ is global column
# $\text{rank}\cdot B + i$. The gather must **keep the gradient** (`losses.gather_with_grad`):
# each rank's loss then also sends gradient into the features computed on the other ranks, and once
# DDP has averaged the gradients, $N$ processes train exactly like one process on the $NB$ batch,
# in loss and in gradient. LAVIS gathers without gradient: its loss is the same, its gradient is
# not. `tests/test_losses.py` proves both statements on two CPU processes. On one process the
# gather is the identity, which is all this notebook uses.

# %% [markdown]
# ## 2. ITM: image-text matching with hard negatives
#
# ITM is a binary classifier: given an image and a caption, do they match? The Q-Former runs with
# the bidirectional mask, so the queries see the image (through cross-attention) and the caption
# at once; a linear head maps each query's output to two logits, which are averaged over queries.
#
# Matching pairs are simply the batch's pairs. Negative pairs need choosing: a random caption is
# usually so obviously wrong that the classifier learns nothing from it. BLIP-2 picks **hard
# negatives** with the help of ITC, which has just scored every image against every caption:
#
# * for every caption, one negative image, drawn from $\mathrm{softmax}$ of that caption's ITC
#   logits over the images, with its own image masked out;
# * for every image, one negative caption, drawn likewise from its row of ITC logits.
#
# So the images that ITC finds most confusable with a caption are drawn most often, yet every
# non-positive keeps a chance. We reuse the 6-pair ITC result from above.

# %%
masked = float("-inf")
negative_image_probs = itc.sim_t2i.masked_fill(itc.positives.t(), masked).softmax(dim=1)  # [text, image]
negative_text_probs = itc.sim_i2t.masked_fill(itc.positives, masked).softmax(dim=1)  # [image, text]

positives_grey = plt.get_cmap("Oranges").with_extremes(bad="lightgrey")
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
panels = (
    (axes[0], negative_image_probs, "caption", "image", "negative image for each caption"),
    (axes[1], negative_text_probs, "image", "caption", "negative caption for each image"),
)
for ax, probs, row_name, column_name, title in panels:
    shown = ax.imshow(np.ma.masked_where(itc.positives.numpy(), probs.numpy()), cmap=positives_grey, vmin=0, vmax=1)
    for row in range(batch):
        for column in range(batch):
            positive = bool(itc.positives[row, column])
            ax.text(column, row, "positive\n(masked)" if positive else f"{probs[row, column]:.2f}",
                    ha="center", va="center", fontsize=7 if positive else 9)
    ax.set(xlabel=column_name, ylabel=row_name, title=title)
fig.colorbar(shown, ax=axes, fraction=0.03, label="sampling probability")
plt.show()

# %% [markdown]
# `sample_hard_negatives` draws one index per row with `torch.multinomial`, first the negative
# images, then the negative captions. Written by hand with a generator in the same state, we get
# the same indices.

# %%
by_hand_generator = torch.Generator().manual_seed(1)
negative_image = torch.multinomial(negative_image_probs, 1, generator=by_hand_generator).squeeze(1)
negative_text = torch.multinomial(negative_text_probs, 1, generator=by_hand_generator).squeeze(1)

package_negatives = losses.sample_hard_negatives(
    itc.sim_i2t, itc.sim_t2i, itc.positives, generator=torch.Generator().manual_seed(1)
)
print("negative image per caption:", negative_image.tolist())
print("negative caption per image:", negative_text.tolist())
assert torch.equal(package_negatives[0], negative_image)
assert torch.equal(package_negatives[1], negative_text)


# %% [markdown]
# Sampling many times shows both promises: the empirical frequencies follow the masked softmax,
# and a positive is never drawn.

# %%
def negative_frequencies(itc_output, draws=4000, seed=2):
    """How often each (caption, image) and (image, caption) negative is drawn by the package."""
    size = len(itc_output.positives)
    image_counts, text_counts = torch.zeros(size, size), torch.zeros(size, size)
    rows = torch.arange(size)
    sampling_generator = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        neg_image, neg_text = losses.sample_hard_negatives(
            itc_output.sim_i2t, itc_output.sim_t2i, itc_output.positives, sampling_generator
        )
        image_counts[rows, neg_image] += 1
        text_counts[rows, neg_text] += 1
    return image_counts / draws, text_counts / draws


image_frequency, text_frequency = negative_frequencies(itc)

fig, ax = plt.subplots(figsize=(4.2, 4))
ax.plot([0, 1], [0, 1], color="grey", lw=1)
ax.scatter(negative_image_probs.flatten(), image_frequency.flatten(), label="negative images", s=18)
ax.scatter(negative_text_probs.flatten(), text_frequency.flatten(), label="negative captions", s=18, marker="x")
ax.set(xlabel="masked softmax probability", ylabel="frequency in 4000 draws", title="sampling follows the softmax")
ax.legend()
plt.show()

largest_gap = max((image_frequency - negative_image_probs).abs().max(), (text_frequency - negative_text_probs).abs().max())
print(f"largest |frequency - probability|: {largest_gap:.3f}")
assert largest_gap < 0.03
assert image_frequency[itc.positives.t()].sum() == 0 and text_frequency[itc.positives].sum() == 0

# %% [markdown]
# With `image_ids`, the caption's own image is not the only positive: another caption of the same
# image must not be drawn as a negative either (it would be a matching pair labelled "no match").

# %%
shared_image_frequency, shared_text_frequency = negative_frequencies(shared)
assert shared_image_frequency[same_image].sum() == 0 and shared_text_frequency[same_image].sum() == 0
assert (shared_image_frequency[~same_image] > 0).all()  # every real negative does get drawn
print("negative images drawn for caption 0 (an image-0 caption):", shared_image_frequency[0].numpy().round(3))

# %% [markdown]
# At batch size 1, or with a batch of captions of one image, there is no negative to draw; the
# package says so instead of failing somewhere deeper.

# %%
with pytest.raises(ValueError, match="at least two different images"):
    losses.sample_hard_negatives(single.sim_i2t, single.sim_t2i, single.positives)

# %% [markdown]
# ### The 3B pairs
#
# A batch of B pairs becomes 3B ITM examples: the B matching pairs (label 1), every caption with its
# negative image, and every image with its negative caption (label 0). The model gathers the texts
# and images by index; the B images are encoded once and shared by the three groups.

# %%
rows = torch.arange(batch)
text_index = torch.cat([rows, rows, negative_text])
image_index = torch.cat([rows, negative_image, rows])
labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long()

package_pairs = losses.itm_pairs(batch, negative_image, negative_text)
for mine, theirs in zip((text_index, image_index, labels), package_pairs):
    assert torch.equal(mine, theirs)
# label 1 exactly for the pairs that are ITC positives
assert torch.equal(labels.bool(), itc.positives[image_index, text_index])
for group, name in enumerate(("matching", "caption + negative image", "image + negative caption")):
    pairs = [(int(t), int(i)) for t, i in zip(text_index, image_index)][group * batch : (group + 1) * batch]
    print(f"{name:>26}: (caption, image) {pairs}  label {labels[group * batch].item()}")

# %% [markdown]
# The ITM head is one `nn.Linear(hidden, 2)` applied to every query output and averaged over the
# queries; the loss is a plain cross-entropy (no label smoothing).

# %%
hidden_size = 8
itm_head = nn.Linear(hidden_size, 2)
query_output = torch.randn(3 * batch, num_queries, hidden_size, generator=generator)
logits = losses.itm_logits(itm_head, query_output)
torch.testing.assert_close(logits, itm_head(query_output).mean(dim=1))
torch.testing.assert_close(losses.itm_loss(logits, labels), F.cross_entropy(logits, labels))

# %% [markdown]
# ## 3. ITG: image-grounded text generation
#
# The third objective asks the Q-Former to write the caption, one token at a time. Under the
# multimodal causal mask a text token sees the queries and the earlier text, but never the image
# itself: everything it knows about the image must come through the queries. ITG thus forces the
# queries to extract what a caption needs. Three details:
#
# * The first token, `[CLS]`, is replaced by **`[DEC]`**, a token that tells the Q-Former
#   "this is a generation pass".
# * Padding positions get the label **-100**, which `cross_entropy` ignores.
# * Position $t$ predicts token $t+1$ (logits shifted left against labels), with label smoothing 0.1.
#
# Token ids here are those of a tiny made-up vocabulary of 120: 0 is padding, 1 is `[CLS]`, 119 is `[DEC]`.

# %%
PAD, CLS, DEC, vocab_size = 0, 1, 119, 120
input_ids = torch.tensor([
    [CLS, 17, 42, 8, 99, PAD, PAD],
    [CLS, 5, 63, PAD, PAD, PAD, PAD],
    [CLS, 12, 34, 56, 78, 90, 11],
])
text_attention_mask = (input_ids != PAD).long()

decoder_ids = input_ids.clone()
decoder_ids[:, 0] = DEC
itg_labels = decoder_ids.masked_fill(text_attention_mask == 0, -100)

package_decoder_ids, package_labels = losses.itg_inputs(input_ids, text_attention_mask, DEC)
assert torch.equal(package_decoder_ids, decoder_ids) and torch.equal(package_labels, itg_labels)

print("position         ", list(range(input_ids.shape[1] - 1)))
print("decoder input    ", decoder_ids[0, :-1].tolist())
print("predicts (label) ", itg_labels[0, 1:].tolist())

# %% [markdown]
# The label at position 0 is never a target (nothing predicts the first token), so it does not
# matter that it is `[DEC]`. By hand: drop the last position's logits, drop the first label, keep
# the positions whose target is not -100, and apply the same smoothed cross-entropy as ITC.

# %%
itg_logits = torch.randn(*input_ids.shape, vocab_size, generator=generator)
predicting, predicted = itg_logits[:, :-1], itg_labels[:, 1:]
has_target = predicted != -100
loss_by_hand = smoothed_cross_entropy(predicting[has_target], F.one_hot(predicted[has_target], vocab_size).float())

print(f"ITG loss: by hand {loss_by_hand:.6f}, package {losses.itg_loss(itg_logits, itg_labels):.6f}")
torch.testing.assert_close(losses.itg_loss(itg_logits, itg_labels), loss_by_hand)

# Logits that predict padding, or the token after the last one, cost nothing.
unused = torch.cat([~has_target, torch.ones(len(input_ids), 1, dtype=torch.bool)], dim=1)
scrambled = itg_logits.clone()
scrambled[unused] = torch.randn(int(unused.sum()), vocab_size, generator=generator)
torch.testing.assert_close(losses.itg_loss(scrambled, itg_labels), loss_by_hand)

# %% [markdown]
# ## 4. All together: `Blip2Stage1`
#
# `Blip2Stage1` wires the three losses to the Q-Former. Per step it runs:
#
# 1. the image pass (queries + image features) and the text pass (caption alone) for ITC;
# 2. hard-negative sampling from the ITC logits, then one bidirectional pass over the 3B ITM pairs;
# 3. one causal pass over the `[DEC]` captions, reusing the image pass's query keys and values
#    (exact, since under the ITG mask queries never attend to text; chapter 2 checks it).
#
# We use the small Q-Former of chapter 2 (`QFormerConfig.small`, here with the 120-word vocabulary)
# and 8 random "images" of 16 feature vectors of width 48, standing in for the frozen encoder's
# output, each with a random 6-to-12-token caption. Two settings differ from the paper's, both
# because this model is tiny and the batch fixed: weights start with standard deviation 0.07
# instead of BERT's 0.02 (0.02 suits width 768; at width 64 we scale it by $\sqrt{768/64}$ to keep
# activations at BERT's scale), and dropout is off (on one fixed batch there is nothing to
# regularise; dropout would only blur the curves).

# %%
torch.manual_seed(0)
config = QFormerConfig.small(vocab_size=vocab_size, initializer_range=0.07, hidden_dropout=0.0, attention_dropout=0.0)
model = Blip2Stage1(config, dec_token_id=DEC)

batch, image_tokens, text_len = 8, 16, 12
image_features = torch.randn(batch, image_tokens, config.encoder_width)
caption_lengths = torch.randint(6, text_len + 1, (batch,))
attention_mask = (torch.arange(text_len) < caption_lengths[:, None]).long()
input_ids = torch.randint(CLS + 1, DEC, (batch, text_len)).masked_fill(attention_mask == 0, PAD)
input_ids[:, 0] = CLS

out = model(input_ids, attention_mask, image_features=image_features, generator=torch.Generator().manual_seed(0))
torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
assert out.sim_i2t.shape == (batch, batch) and out.itm_logits.shape == (3 * batch, 2)

# %% [markdown]
# Before training, every loss sits near what guessing uniformly costs: $\ln 8$ for picking one of 8
# captions, $\ln 2$ for yes/no, $\ln 120$ for a word from the vocabulary.

# %%
uniform_guess = {"ITC": math.log(batch), "ITM": math.log(2), "ITG": math.log(vocab_size)}
initial = {"ITC": out.loss_itc.item(), "ITM": out.loss_itm.item(), "ITG": out.loss_itg.item()}
for name in initial:
    print(f"{name}: {initial[name]:.3f}   (uniform guess {uniform_guess[name]:.3f})")
    assert abs(initial[name] - uniform_guess[name]) < 0.25

# %% [markdown]
# Now we optimise the sum on this one batch with AdamW. The sampling generator is created once, so
# each step draws fresh (but reproducible) hard negatives.

# %%
steps = 150
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
negatives_generator = torch.Generator().manual_seed(0)
history = {"ITC": [], "ITM": [], "ITG": []}
for step in range(steps):
    out = model(input_ids, attention_mask, image_features=image_features, generator=negatives_generator)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    for name, value in zip(history, (out.loss_itc, out.loss_itm, out.loss_itg)):
        history[name].append(value.item())
print({name: f"{values[0]:.3f} -> {values[-1]:.3f}" for name, values in history.items()})

# %% [markdown]
# Each curve has a floor that is not 0. With label smoothing the best a model can do is predict
# the smoothed target exactly, which costs its entropy: about 0.47 for ITC over 8 candidates and
# 0.80 for ITG over 120 words. ITM has no smoothing, but it has a plateau: a third of its pairs
# match, and before the model can tell pairs apart the best it can do is predict that ratio,
# which costs the entropy of (1/3, 2/3), 0.64.

# %%
def smoothed_target_entropy(num_classes, smoothing=LABEL_SMOOTHING):
    """Lowest possible label-smoothed cross-entropy: the entropy of the smoothed one-hot target."""
    target = torch.full((num_classes,), smoothing / num_classes)
    target[0] += 1 - smoothing
    return -(target * target.log()).sum().item()


floors = {"ITC": smoothed_target_entropy(batch), "ITG": smoothed_target_entropy(vocab_size)}
match_rate = 1 / 3
label_ratio_entropy = -(match_rate * math.log(match_rate) + (1 - match_rate) * math.log(1 - match_rate))

fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for ax, (name, values) in zip(axes, history.items()):
    ax.plot(values, color="C0")
    ax.axhline(uniform_guess[name], color="grey", ls=":", label="uniform guess")
    if name in floors:
        ax.axhline(floors[name], color="C2", ls="--", label="floor (label smoothing)")
    else:
        ax.axhline(label_ratio_entropy, color="C1", ls="--", label="predict the 1:2 label ratio")
    ax.set(title=name, xlabel="step", ylim=(0, None))
    ax.legend(fontsize=8)
axes[0].set_ylabel("loss")
fig.tight_layout()
plt.show()

# %% [markdown]
# The three losses learn at different speeds. ITC is the quickest and reaches its floor within a
# few dozen steps: it only has to place 8 images and 8 captions in a shared space. ITG falls
# steadily as the 8 captions are memorised. ITM first learns the label ratio and sits on that
# plateau for a long while: it can only go further once the queries fuse image and caption into
# something a linear head can separate. Then it drops to almost 0.

# %%
final = {name: float(np.mean(values[-5:])) for name, values in history.items()}
for name in history:
    assert final[name] < 0.5 * history[name][0], f"{name} did not fall: {history[name][0]:.3f} -> {final[name]:.3f}"
assert abs(final["ITC"] - floors["ITC"]) < 0.05
assert final["ITM"] < 0.5 * label_ratio_entropy  # below the plateau: it tells matching pairs apart

# %% [markdown]
# ## Summary
#
# * **ITC**: max over queries of the query-caption cosine, divided by a clamped learnable temperature;
#   symmetric cross-entropy with label smoothing 0.1; all captions of one image are positives.
# * **ITM**: one hard negative image per caption and one hard negative caption per image, drawn from
#   the masked softmax of the ITC logits; 3B pairs, a linear head averaged over queries.
# * **ITG**: `[DEC]` instead of `[CLS]`, padding labelled -100, next-token cross-entropy with label
#   smoothing 0.1.
#
# Trained together on one batch, all three fall (section 4). The next chapter trains the same model
# in the lite world and measures what it has learned by retrieval on unseen images.
