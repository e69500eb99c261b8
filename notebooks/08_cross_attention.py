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
# # Chapter 8 — Seeing inside: what the queries look at
#
# The Q-Former's queries are BLIP-2's only window on the image: they cross-attend to the frozen
# encoder's patch features, and everything downstream (ITC, ITM, the LLM) sees the image only
# through them. Their cross-attention weights therefore say where the model looks. Reading them
# correctly takes care (LAVIS issues 549 and 646 show attempts that went wrong):
#
# - cross-attention exists only in some layers (0, 2, 4 here; 0, 2, ..., 10 in the paper's
#   Q-Former), and only the query rows have it: a map is `[heads, queries, image tokens]`;
# - the encoder's prefix tokens must be dropped (ViT-g has one CLS token; our EfficientNet none),
#   and the rest reshaped row by row to the encoder's patch grid (7 x 7 here, 16 x 16 for ViT-g at
#   224 px);
# - text never attends to the image: a word reaches it only through the queries.
#
# This chapter draws the maps of chapter 4's model, measures over the whole test split whether the
# queries look at the objects and whether they specialise, and follows single words of a caption
# to the image. `blip2_lite.attention_maps` holds the code; `tests/test_attention_maps.py` proves
# on a synthetic encoder with one distinctive patch that every map peaks where it must.

# %%
import matplotlib.pyplot as plt
import torch

from blip2_lite.attention_maps import (
    cross_attention_maps,
    explore,
    itc_best_query,
    itm_gradcam,
    plot_maps,
    token_grid,
    word_maps,
)
from blip2_lite.lite import STAGE1_PRESETS, load_lite_world, run_stage1, run_stage2
from blip2_lite.lite.stage1_recipe import build_stage1_model

torch.manual_seed(0)

world = load_lite_world()
test_split, test = world.dataset["test"], world.splits["test"]
model, _, _ = run_stage1("course", world=world)  # chapter 4's run, from the cache
grid = token_grid(world.encoder)
print(grid, "| the Q-Former's cross-attention layers:",
      [i for i in range(model.config.num_layers) if model.config.has_cross_attention(i)])

# %% [markdown]
# ## 1. One image: every query of one layer, one query across layers, the mean
#
# `cross_attention_maps` runs the image side of the Q-Former (queries only, as in the ITC image
# pass) with attention weights kept, and returns `[images, layers, heads, queries, 7, 7]`.

# %%
image_embeds = model.image_embeds(image_features=test.features.float())
maps = cross_attention_maps(model.qformer, image_embeds, grid)
print("maps:", tuple(maps.maps.shape), "for layers", maps.layers)

index = 3
image = test_split[index]["image"]
print("caption:", test_split[index]["captions"][0])
queries = model.config.num_query_tokens
for layer in (maps.layers[0], maps.layers[-1]):
    plot_maps(image, maps.layer(layer)[index].mean(dim=0), [f"layer {layer}, query {q}" for q in range(queries)])
    plt.show()
plot_maps(image, torch.cat([maps.maps[index, :, :, 0].mean(dim=1), maps.maps[index].mean(dim=(1, 2))]),
          [f"query 0, layer {layer}" for layer in maps.layers] + [f"all queries and heads, layer {layer}"
                                                                  for layer in maps.layers], columns=len(maps.layers))
plt.show()

# %% [markdown]
# To browse every layer, head and query of this image (sliders in JupyterLab; without a widget
# front end, the first view only):

# %%
explore(image, maps, index)

# %% [markdown]
# ## 2. Over the test split: do the queries look at the objects?
#
# One picture proves little. For every test image, mark the patches that an object's bounding box
# touches, and measure the share of each map's attention that falls there. A query that looked
# nowhere in particular would put there the objects' share of the patches (about a quarter). The
# same Q-Former before training (MiniLM-initialised, random cross-attention) is the control.

# %%
cell = world.encoder.image_size / grid.height
on_object = torch.zeros(len(test_split), grid.height, grid.width)
for i, objects in enumerate(test_split["objects"]):
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        on_object[i, int(y0 // cell):int(min(y1, 223) // cell) + 1, int(x0 // cell):int(min(x1, 223) // cell) + 1] = 1


def object_mass(maps):
    """Share of attention on object patches ``[layers, queries]``, averaged over heads and images."""
    return (maps.maps.mean(dim=2) * on_object[:, None, None]).sum(dim=(-1, -2)).mean(dim=0)


untrained = build_stage1_model(world, STAGE1_PRESETS["course"]).eval()
before = object_mass(cross_attention_maps(untrained.qformer, untrained.image_embeds(image_features=test.features.float()),
                                          grid))
after = object_mass(maps)
share = on_object.mean().item()
print(f"objects cover {100 * share:.1f}% of the patches")
for position, layer in enumerate(maps.layers):
    print(f"layer {layer}: attention on objects {100 * before[position].mean():.1f}% before stage 1, "
          f"{100 * after[position].mean():.1f}% after (queries: {100 * after[position].min():.1f}-"
          f"{100 * after[position].max():.1f}%)")
assert abs(before.mean() - share) < 0.03, "the untrained queries should look everywhere alike"
assert after[-1].mean() > 2 * share, "after stage 1 the last cross layer does not look at the objects"
assert int((after[-1] > 2 * share).sum()) >= len(after[-1]) - 1, "after stage 1 at most one query looks elsewhere"

# %% [markdown]
# Do the queries specialise (one per object, or per region)? Measured, not claimed: below, the
# largest difference between two queries' maps of the same image, per layer.

# %%
head_mean = maps.maps.mean(dim=2)  # [images, layers, queries, 7, 7]
spread = (head_mean - head_mean[:, :, :1]).abs().amax(dim=(0, 2, 3, 4))
for layer, value in zip(maps.layers, spread):
    print(f"layer {layer}: queries' maps differ by at most {value:.4f} (attention weights sum to 1 over 49 patches)")

# %% [markdown]
# In this course-sized model the queries specialise only in one way. In the last cross-attention
# layer all of them but one put nearly the same map on the objects; the odd one out (printed in
# section 2: the lowest share of the last layer) puts less on the objects than their share of the
# patches: it reads the background around them (what it carries from there is not measured
# here). Among the others, no query takes one object or one region: with scenes of at most three
# objects and a few hundred training steps, ITC's max over queries is satisfied by queries that all
# carry the whole scene; the paper's 32 queries trained for 250k steps on web images have more
# reason to divide the work.
#
# ## 3. The query that decides a caption's ITC score
#
# ITC scores an (image, caption) pair by its best-matching query. `itc_best_query` names it; its
# map shows what the pair was matched on.

# %%
ids, mask, _ = test.flat_texts()
captions = [index * 5 + k for k in range(3)]
best, cosines = itc_best_query(model, image_embeds[[index] * 3], ids[captions], mask[captions])
last = maps.layer(maps.layers[-1])[index].mean(dim=0)
for row, (caption, q) in enumerate(zip(captions, best.tolist())):
    print(f"query {q} (cosine {cosines[row, q]:.3f}) matched: {world.tokenizer.decode(ids[caption][mask[caption].bool()][1:-1])}")
plot_maps(image, last[best], [f"best query {q}" for q in best.tolist()], columns=3)
plt.show()

# %% [markdown]
# ## 4. From words to patches
#
# Two views of where the image supports a caption, both through the ITM pass (text and queries
# attend to each other):
#
# - **word -> query -> patch** (`word_maps`): a word's attention to each query, times that query's
#   cross-attention map;
# - **ITM Grad-CAM** (`itm_gradcam`): cross-attention weighted by how much it raised the match
#   logit, `weight * max(gradient, 0)`: BLIP's Grad-CAM with query rows where BLIP has text rows.

# %%
caption = index * 5
words = world.tokenizer.convert_ids_to_tokens(ids[caption][mask[caption].bool()])
per_word = word_maps(model, image_embeds[[index]], ids[[caption]], mask[[caption]], grid)[0]
cams, logits = itm_gradcam(model, image_embeds[[index]], ids[[caption]], mask[[caption]], grid)
shown = [i for i, w in enumerate(words) if w not in ("[CLS]", "[SEP]")][:7]
heats = torch.cat([per_word[shown], cams.maps[0].sum(dim=(0, 1, 2))[None]])
plot_maps(image, heats, [f"word '{words[i]}'" for i in shown] + [f"Grad-CAM (ITM {logits[0, 1]:.2f})"])
plt.show()
assert torch.allclose(per_word.sum(dim=(-1, -2)), torch.ones(len(per_word)), atol=1e-4)  # mixtures of query maps

# %% [markdown]
# A word can only mix the queries' maps. Where the queries look alike (section 2), so do the
# words: in this course-sized model "orange" and "triangle" cannot point to different objects, only
# weigh the objects against the background differently.
# Grad-CAM, which weighs the cross-attention by its effect on the match logit, separates more.
#
# How do the maps change with the caption? Below, the same image with its five captions: the
# Grad-CAM of each, and how far apart the captions' mean word maps are.

# %%
five = [index * 5 + k for k in range(5)]
cams, logits = itm_gradcam(model, image_embeds[[index] * 5], ids[five], mask[five], grid)
per_caption = [word_maps(model, image_embeds[[index]], ids[[c]], mask[[c]], grid)[0, 1:-1].mean(dim=0) for c in five]
texts = [world.tokenizer.decode(ids[c][mask[c].bool()][1:-1]) for c in five]
plot_maps(image, cams.maps.sum(dim=(1, 2, 3)), [f"ITM {logit:.2f}: {t[:28]}" for logit, t in zip(logits[:, 1], texts)],
          columns=5, size=3.0)
plt.show()
gap = max((a - b).abs().max().item() for a in per_caption for b in per_caption)
print(f"largest difference between two captions' mean word maps: {gap:.4f}")

# %% [markdown]
# In the course-sized model the word maps barely move with the caption (the difference printed
# above is small next to the 1/49 a uniform map puts on each patch): the queries that look at
# the objects look alike, so whatever the words, they mix nearly the same maps. Grad-CAM, tied to
# the ITM logit, moves more.

# %% [markdown]
# ## 5. After stage 2
#
# Stage 2 trains the same Q-Former for a frozen LLM (chapter 6). Does it still look at the objects?

# %%
stage2_t5, _, _ = run_stage2("t5", "course", world=world, stage1_model=model, progress=False)  # chapter 6, cached
after2 = object_mass(cross_attention_maps(stage2_t5.qformer, stage2_t5.image_embeds(image_features=test.features.float()),
                                          grid))
for position, layer in enumerate(maps.layers):
    print(f"layer {layer}: attention on objects {100 * after[position].mean():.1f}% after stage 1, "
          f"{100 * after2[position].mean():.1f}% after stage 2 (T5)")

# %% [markdown]
# ## 6. The same code at full scale
#
# For the paper's models, `token_grid` reads ViT-g's layout (one CLS token, then 16 x 16 patches
# at 224 px) from the encoder, and the rest is unchanged. The cell below runs when the retrieval
# checkpoint `Salesforce/blip2-itm-vit-g` can be had (online, or already in the Hugging Face
# cache; a GPU makes it quick) and says so when it cannot (offline, as in CI).

# %%
from blip2_lite.convert.engine import CheckpointError
from blip2_lite.convert.pretrained import from_pretrained

try:
    full = from_pretrained("Salesforce/blip2-itm-vit-g", device="cuda" if torch.cuda.is_available() else "cpu")
except CheckpointError as error:
    print("skipped, no full-size checkpoint here:", str(error).split(":")[0])
else:
    full_embeds = full.image_embeds(full.image_encoder.preprocess([image]).to(next(full.parameters()).device))
    full_maps = cross_attention_maps(full.qformer, full_embeds, token_grid(full.image_encoder))
    print("full-size maps:", tuple(full_maps.maps.shape), "for layers", full_maps.layers)  # [1, 6, 12, 32, 16, 16]
    plot_maps(image, full_maps.maps[0, -1].mean(dim=0)[:8].cpu(), [f"query {q}" for q in range(8)])
    plt.show()

# %% [markdown]
# ## Summary
#
# - A cross-attention map is `[heads, queries, patches]` of a cross-attention layer, with the
#   encoder's prefix tokens dropped and the patches reshaped row by row to its grid.
# - After stage 1 all queries of the last cross-attention layer but one put more than twice the
#   objects' share of the patches on the objects, and the odd one out reads the background;
#   untrained, they look everywhere alike.
# - Beyond that, the course-sized model's queries do not specialise by object or region.
# - Words reach the image only through the queries; word maps and ITM Grad-CAM show which patches
#   support a caption.
