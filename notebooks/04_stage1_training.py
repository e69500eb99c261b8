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
# # Chapter 4 — Stage 1 in the lite world: training and retrieval
#
# Stage 1 of BLIP-2 (Li et al., 2023) is representation learning: the Q-Former's learned queries
# cross-attend to the features of a frozen image encoder, and three objectives trained together
# (image-text contrastive learning, image-text matching and image-grounded text generation) teach
# them to extract what a caption can say about an image. Chapter 3 built each of those losses by
# hand and trained `Blip2Stage1` on one batch of random features. This chapter trains the same
# model on real data, the lite world built in chapter 0, and measures what it has learned:
#
# 1. training with the `course` preset, its three losses and its validation recall;
# 2. retrieval on the unseen test split, ranked by ITC and re-ranked by ITM, next to chance.

# %%
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

from blip2_lite.evaluate.retrieval import itc_embeddings
from blip2_lite.lite import STAGE1_PRESETS, load_lite_world, run_stage1
from blip2_lite.lite.captions import caption_holds
from blip2_lite.lite.shapes_world import chance_levels
from blip2_lite.losses import itc_similarity
from blip2_lite.train import plot_history

# %% [markdown]
# ## 1. Stage 1 for real: the lite world
#
# Chapter 0 built the lite world: 3000 training scenes of coloured shapes with 5 captions each,
# their frozen EfficientNet-Lite0 features (cached: the encoder is frozen, so there is nothing to
# recompute), and the MiniLM BERT that initialises the Q-Former. Every step runs all three
# objectives on a batch of distinct images, exactly as in chapter 3; only the scale differs. The
# `course` preset is what a 2-core CPU can afford inside this course: 200 steps, about two minutes
# (the course spends more of its time in chapter 6, where the small OPT must first learn to read).
# The `long` preset (`python -m blip2_lite stage1 --preset long`) sees fifteen times as many
# samples, with 16 queries, for better numbers.
#
# Two things make the step cheap enough (`benchmarks/stage1_step.py` measures them against a naive
# step): the frozen encoder is out of the loop (cached features), and the Q-Former computes each
# image's cross-attention keys/values once per step, for the image pass and all 3B ITM pairs, and
# lets ITG reuse the queries' keys/values from the image pass. The vision LayerNorm's weight and
# bias are folded into those key/value projections, so the backward pass computes no gradient for
# the constant features (`QFormer.image_keys_values`; the same losses and gradients,
# `tests/test_losses.py`).
#
# The `course` preset also departs from the paper's recipe in three places, each a preset field, each
# measured: together they make a step 2.9x cheaper on 2 cores (2.07 -> 0.72 s at batch 32), which
# buys three times the training in the same minutes.
#
# * `dropout=0.0` instead of BERT's 0.1: the run sees each scene about twice, so there is
#   little to regularise yet, and dropout's random masks alone cost 14% of a step. Measured with
#   ITC alone at batch 64: validation R@1 23% after 132 steps with dropout, 31% after 150 without.
# * `world_itg_vocab=True`: ITG predicts among the 56 word pieces the world's captions use, not
#   BERT's 30,523. The loss is the same cross-entropy restricted to those words; the paper's head spends
#   99.8% of its work on words no caption needs.
# * `itm_pairs=8`: ITM scores 8 of the batch's 32 pairs (each with its two hard negatives, drawn
#   from the whole batch). ITM's joint pass over 3 pairs per image is the most expensive part of a
#   step.
#
# The `paper` preset keeps the paper's recipe for the same number of steps, for comparison.
#
# Training is resumable: checkpoints (model, optimizer, scheduler, every RNG state) are written
# every 100 steps, and re-running this cell continues an interrupted run, or, once finished,
# just loads it.

# %%
world = load_lite_world()
preset = STAGE1_PRESETS["course"]
print(preset)
model, stage1_history, test_metrics = run_stage1("course", world=world)

# %% [markdown]
# The training losses and the validation recall (ITC retrieval R@1 on the 300 validation images,
# measured every 100 steps):

# %%
plot_history(stage1_history, "stage 1 (course preset)")
plt.show()

# %%
def window_mean(values, start, length=20):
    return float(np.mean(values[start : start + length] if start >= 0 else values[start:]))


for name in ("itc", "itm", "itg"):
    values = stage1_history.losses[name]
    first, last = window_mean(values, 0), window_mean(values, -20)
    print(f"{name}: {first:.3f} -> {last:.3f}")
    assert last < first, f"{name} did not fall"
assert stage1_history.metrics["i2t_r1"][-1] > stage1_history.metrics["i2t_r1"][0]

# %% [markdown]
# ## 2. Retrieval on the test split
#
# 500 unseen test images, 2500 captions. Retrieval ranks by the ITC similarity (max over queries
# of the cosine); then ITM re-scores each query's top-k candidates (score = ITM match logit + ITC
# cosine, as in LAVIS). Besides the exact recall (the caption's own image), the *semantic* R@1
# counts a top result whose content fits the caption: a few captions describe several test
# images (chapter 0), which caps exact text->image recall.

# %%
chance = chance_levels(world.dataset)
rows = [
    ("image -> text R@1", "i2t_r1"),
    ("image -> text R@5", "i2t_r5"),
    ("text -> image R@1", "t2i_r1"),
    ("text -> image R@5", "t2i_r5"),
    ("image -> text semantic R@1", "i2t_semantic_r1"),
    ("text -> image semantic R@1", "t2i_semantic_r1"),
]
print(f"{'metric':28s} {'ITC':>7s} {'+ITM re-rank':>13s} {'chance':>7s}")
for label, key in rows:
    chance_value = f"{chance[key]:6.1f}%" if key in chance else "      -"
    print(f"{label:28s} {test_metrics[key]:6.1f}% {test_metrics['itm_' + key]:12.1f}% {chance_value}")

# %% [markdown]
# The course holds its stage 1 to two bars on the test split: image->text R@1 of at least 50% and
# text->image R@1 of at least 40% with ITC alone (chance: 0.2%).

# %%
assert test_metrics["i2t_r1"] >= 50, f"image->text R@1 {test_metrics['i2t_r1']:.1f}% is below the course's 50%"
assert test_metrics["t2i_r1"] >= 40, f"text->image R@1 {test_metrics['t2i_r1']:.1f}% is below the course's 40%"
for direction in ("i2t", "t2i"):
    assert test_metrics[f"{direction}_r5"] > 5 * chance[f"{direction}_r5"], f"{direction} R@5 is not far above chance"

# %% [markdown]
# What the numbers say: after a few minutes on a CPU, ITC retrieves the right caption for most
# test images, a few hundred times more often than chance. ITM has had the same 200
# steps, on a quarter of the pairs; whether its re-ranking helps yet is an empirical question,
# which the table above answers for this run rather than assumes.
#
# The paper re-ranks because ITM, which reads image and text together, should judge a pair better
# than ITC's single dot product. That takes ITM longer to learn. A binary classifier whose labels
# are 1 positive to 2 negatives starts at a loss of $H(1/3) = 0.637$, the entropy of its labels, and
# only a loss below that says it tells matches from hard negatives. The next cell puts this run's
# last ITM losses beside that plateau, and the change re-ranking makes beside the +2 points of R@1
# in each direction that the lite world aims for (the README's probes section measures why it is
# not reached at this budget: ITM needs more labelled pairs than 200 steps give it).

# %%
itm_plateau = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3))
print(f"ITM loss over the last 50 steps {window_mean(stage1_history.losses['itm'], -50, 50):.3f} "
      f"(plateau: {itm_plateau:.3f})")
for direction, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
    change = test_metrics[f"itm_{direction}_r1"] - test_metrics[f"{direction}_r1"]
    print(f"{name}: re-ranking changes R@1 by {change:+.1f} points ({'meets' if change >= 2 else 'misses'} +2)")

# %% [markdown]
# Some examples: test images with their three best captions by ITC, two whose best caption is
# right and two whose best caption is wrong (the first of each kind in the test split). ✓ marks one
# of the image's own captions, ≈ a caption written for another image that fits this one too, ✗ a
# wrong one. The misses are instructive: look at which attribute the model confuses.

# %%
test_split, test_data = world.dataset["test"], world.splits["test"]
ids, mask, text_image = test_data.flat_texts()
image_itc, text_itc = itc_embeddings(model, test_data.features, ids, mask, bf16=True)  # as the test metrics above
scores = itc_similarity(image_itc, text_itc)
all_captions = [c for per_image in test_split["captions"] for c in per_image]
all_facts = [f for per_image in test_split["caption_facts"] for f in per_image]

top1_is_own = text_image[scores.argmax(dim=1)] == torch.arange(len(scores))
hits = torch.nonzero(top1_is_own).flatten()[:2].tolist()
misses = torch.nonzero(~top1_is_own).flatten()[:2].tolist()

fig, axes = plt.subplots(1, 4, figsize=(16, 5.2))
for ax, image_index in zip(axes, hits + misses):
    objects = test_split[image_index]["objects"]
    ax.imshow(test_split[image_index]["image"])
    ax.axis("off")
    lines = []
    for text_index in scores[image_index].topk(3).indices.tolist():
        own = int(text_image[text_index]) == image_index
        mark = "✓" if own else ("≈" if caption_holds(all_facts[text_index], objects) else "✗")
        lines.append(f"{mark} {textwrap.fill(all_captions[text_index], 40)}")
    ax.set_title("\n".join(lines), fontsize=8, loc="left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# * We trained `Blip2Stage1`, a Q-Former initialised from MiniLM, on the lite world's cached frozen
#   image features with the `course` preset: ITC + ITM + ITG on batches of distinct images, with
#   resumable checkpoints, so later chapters load this run instead of training it again. Three
#   stated deviations from the paper's recipe (no dropout, ITG over the world's words, ITM on a
#   quarter of the pairs) make each step 2.9x cheaper; the `paper` preset keeps the recipe.
# * All three losses fell over training, and the validation recall rose.
# * On the 500 unseen test images, ITC retrieval meets the course's bars (R@1 at least 50% image->text
#   and 40% text->image; chance is 0.2%). Semantic recall also credits a retrieved image that fits
#   the caption, which exact recall cannot.
# * Re-ranking the top candidates with ITM is measured, not assumed: the table reports both rankings
#   for this run, and the cell after it puts ITM's loss beside its plateau and the change in R@1
#   beside the +2 points the lite world aims for.
#
# The exact numbers depend on the machine and are printed above rather than quoted here. The next
# chapter hands the queries' outputs to a frozen language model: stage 2.
