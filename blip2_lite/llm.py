"""The frozen language models of the lite world: a small OPT and a small FlanT5-style T5.

BLIP-2's LLM knows the language but has never seen an image. Here no pretrained OPT or T5 ships
offline (REFERENCE.md), so we pretrain tiny ones on the *text* of the training split and then
freeze them; stage 2 learns soft visual prompts that the frozen LLM reads like text.

What the LLMs learn, and why:

* One byte-level BPE tokenizer for both families (ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the T5
  convention, where pad is also the decoder start). It adds no special tokens by itself: code
  appends ``</s>`` to targets explicitly. Its training text holds the prompt words without a
  leading space, so " Question" is tokenised as "Ġ" + "Question": the "Question" that follows a
  soft prompt in stage 2 is then the very token the LLM learned after a caption.
* OPT (decoder-only) reads documents: each caption alone, and reading-comprehension documents
  "{caption} Question: {q} Answer: {a}</s>", so it learns to answer from the preceding context.
  In stage 2 the image's soft prompt takes the caption's place. Each document gets a row of its
  own, after an eos (as OPT's own tokenizer does; so "</s>" alone prompts a caption), starting at
  a random position so that all of OPT's learned position embeddings are trained: in stage 2 the
  text starts after the soft prompt, not at position 0. (Packed GPT-style, several documents per
  row, this small model did not learn to use the context at all in 2.5x our time budget: it must
  first learn to ignore the unrelated documents before the current one.)
* T5 (encoder-decoder) reads prefix-LM pairs (the first k words of a caption -> the rest),
  paraphrase pairs (one caption of a scene -> another caption of the same scene) and
  "{caption} Question: {q} Short answer:" -> "{a}</s>". BLIP-2's stage-2 objective for FlanT5 is
  such a prefix LM, with the soft prompt in the encoder. The paraphrase pairs are what make T5
  follow a soft prompt in stage 2 at all: they are the only text whose *content* (colours, shapes,
  counts) the decoder must read from the encoder rather than guess. Measured here (one seed, course
  budgets): without them stage 2 gave T5 one caption for every image; with them its captions vary
  and fit their own image better than another (``evaluate.caption_image_gap`` 0 -> 4.9 points).
  The same documents for OPT ("{caption}. {caption}") did not help within its budget: after 300
  steps it did not yet copy facts from the first description (paraphrase F1 54%, T5 63%), and its
  stage-2 captions stayed the same for every image.

``load_lite_llm`` trains once and caches each model under ``cache_root()/llm/{family}-{digest}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from .bridge import PROMPTS
from .data import majority_answer
from .evaluate import vqa_scores
from .paths import cache_root
from .train import TrainConfig, config_digest, train

LLM_FAMILIES = ("opt", "t5")
MODEL_CLASSES = {"opt": OPTForCausalLM, "t5": T5ForConditionalGeneration}
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2: the order in which the tokenizer learns them
VOCAB_SIZE = 512
OPT_SEQ_LEN = 128  # OPT's learned positions: the soft prompt plus the text must fit

# Model sizes (FlanT5's layout for T5: gated-GELU feed-forward, untied LM head). The T5 has 2 + 2
# layers: measured here, 3 + 3 layers cost 40% more per step and read the context no better
# within the time budget.
MODEL_SIZES = {
    "opt": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024),
    "t5": dict(d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2, num_decoder_layers=2),
}
# About 45 s of training per family on 2 idle CPU cores with bf16 autocast (plus ~10 s for the
# corpus and three validations); the held-out perplexity has nearly flattened by then. Answering
# from the context is learned later than the language itself: within this budget T5 starts to
# look colours and shapes up in it, OPT only starts to count.
LLM_TRAIN = {
    "opt": TrainConfig(steps=300, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=20, eval_every=100,
                       checkpoint_every=300),
    "t5": TrainConfig(steps=180, batch_size=64, lr=2e-3, min_lr=2e-4, warmup_steps=15, eval_every=60,
                      checkpoint_every=180),
}
# Pretraining sees each text about once: nothing to regularise, and dropout slows what it learns.
DROPOUT = 0.0
CORPUS_VERSION = 3  # bump when the documents, pairs or tokenizer change: cached models are keyed by it


# ----------------------------------------------------------------------------- tokenizer


def _prompt_words() -> list[str]:
    """The fixed text around each prompt's slot, e.g. "Question:" and "Answer:"."""
    return [part.strip() for template in PROMPTS.values() for part in template.split("{}") if part.strip()]


def tokenizer_texts(split) -> list[str]:
    """Every caption, question and (annotator) answer of the split, and the prompt words."""
    captions = [c for per_image in split["captions"] for c in per_image]
    questions = [q for per_image in split["questions"] for q in per_image]
    answers = [a for per_image in split["answers"] for ten in per_image for a in ten]
    return captions + questions + answers + _prompt_words()


def train_tokenizer(split) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary of at most ``VOCAB_SIZE``) trained on the split's text.

    All 256 bytes are in the vocabulary, so any text (unseen words, other scripts) round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, EOS, UNK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(tokenizer_texts(split), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, model_max_length=OPT_SEQ_LEN)


# ----------------------------------------------------------------------------- corpora


def _qa_with_context(split, rng: random.Random):
    """(context, question, ten answers, question type) per question of the split; the context is
    one caption of the same image, chosen at random."""
    for captions, questions, answers, types in zip(split["captions"], split["questions"], split["answers"],
                                                   split["question_types"]):
        for question, ten, qtype in zip(questions, answers, types):
            yield captions[rng.randrange(len(captions))], question, ten, qtype


def opt_documents(split, seed: int = 0) -> list[str]:
    """Each caption as "{caption}</s>", then per question "{context} Question: {q} Answer: {a}</s>"."""
    captions = [f"{c}{EOS}" for per_image in split["captions"] for c in per_image]
    reading = [f"{context} {PROMPTS['vqa_opt'].format(q)} {majority_answer(ten)}{EOS}"
               for context, q, ten, _ in _qa_with_context(split, random.Random(seed))]
    return captions + reading


def paraphrases(split, rng: random.Random):
    """(another caption of the same image, caption) for every caption of the split."""
    for captions in split["captions"]:
        for j, caption in enumerate(captions):
            other = rng.choice([i for i in range(len(captions)) if i != j])
            yield captions[other], caption


def t5_pairs(split, seed: int = 0) -> list[tuple[str, str]]:
    """Prefix-LM splits of each caption (first k words -> the rest, k uniform in [0, n_words - 1],
    so k = 0 gives an empty source), then per caption another caption of its image -> it, then
    "{context} Question: {q} Short answer:" -> "{a}</s>"."""
    rng = random.Random(seed)
    pairs = []
    for caption in (c for per_image in split["captions"] for c in per_image):
        words = caption.split(" ")
        k = rng.randrange(len(words))
        pairs.append((" ".join(words[:k]), " ".join(words[k:]) + EOS))
    pairs += [(source, f"{target}{EOS}") for source, target in paraphrases(split, rng)]
    pairs += [(f"{context} {PROMPTS['vqa_t5'].format(q)}", f"{majority_answer(ten)}{EOS}")
              for context, q, ten, _ in _qa_with_context(split, rng)]
    return pairs


# ----------------------------------------------------------------------------- models


def lite_llm_config(family: str, tokenizer) -> OPTConfig | T5Config:
    """A small OPT or FlanT5-style T5 config over ``tokenizer``'s vocabulary."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "opt":
        return OPTConfig(vocab_size=len(tokenizer), max_position_embeddings=OPT_SEQ_LEN, do_layer_norm_before=True,
                         word_embed_proj_dim=MODEL_SIZES["opt"]["hidden_size"], dropout=DROPOUT,
                         bos_token_id=tokenizer.eos_token_id, **ids, **MODEL_SIZES["opt"])
    if family == "t5":
        return T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        dropout_rate=DROPOUT, decoder_start_token_id=tokenizer.pad_token_id, **ids, **MODEL_SIZES["t5"])
    raise ValueError(f"unknown LLM family {family!r}; expected one of {LLM_FAMILIES}")


def build_llm(family: str, tokenizer, seed: int = 0):
    """A freshly initialised lite LLM (seeded)."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](lite_llm_config(family, tokenizer))
    if family == "t5":
        # transformers draws an untied LM head from N(0, 1): over unit-RMS hidden states of width
        # 256 the first logits have a std of 16 and the first loss is ~100. Scale it as T5 scales
        # a tied head (by d_model ** -0.5), so that training starts near the uniform loss.
        torch.nn.init.normal_(model.lm_head.weight, std=model.config.d_model ** -0.5)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients: the LLM stays as pretrained in stage 2."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- batches and losses


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows])


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts)["input_ids"] if texts else []


def _t5_batch(sources: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    # An empty source (a prefix-LM split at k = 0) becomes one visible pad token: the encoder
    # needs at least one position, and the decoder learns to start a caption from "nothing".
    sources = [s or [pad_id] for s in sources]
    input_ids = _pad(sources, pad_id)
    attention_mask = _pad([[1] * len(s) for s in sources], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _pad(targets, -100)}


def _opt_batch(documents: list[list[int]], eos_id: int, pad_id: int, rng: torch.Generator | None = None) -> dict:
    """Documents, each after an eos (OPT's own tokenizer starts every text with ``</s>``), padded on
    the right. With ``rng`` each row starts at a random position in ``[0, OPT_SEQ_LEN - length]``;
    without, at 0. Every token of every document is a target."""
    rows = [[eos_id] + d for d in documents]
    too_long = max(len(r) for r in rows)
    if too_long > OPT_SEQ_LEN:
        raise ValueError(f"a document of {too_long} tokens exceeds OPT's {OPT_SEQ_LEN} positions")
    input_ids = _pad(rows, pad_id)
    attention_mask = _pad([[1] * len(r) for r in rows], 0)
    if rng is None:
        starts = torch.zeros(len(rows), 1, dtype=torch.long)
    else:
        room = torch.tensor([OPT_SEQ_LEN - len(r) + 1 for r in rows])
        starts = (torch.rand(len(rows), generator=rng) * room).long()[:, None]
    # Padding sits after the text, so its positions (clamped to stay in range) are never read.
    position_ids = (starts + torch.arange(input_ids.shape[1])).clamp(max=OPT_SEQ_LEN - 1)
    labels = _pad(rows, -100)
    labels[:, 0] = -100  # the eos only conditions: the model shifts the labels itself
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def _token_nll(model, family: str, batch: dict) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens, and their number."""
    labels = batch["labels"]
    if family == "t5":
        logits = model(**batch).logits  # the labels, shifted right, are the decoder's inputs
    else:  # position t predicts token t + 1
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        labels = labels[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll.item(), int((labels != -100).sum())


def _examples(family: str, tokenizer, split, seed: int):
    """The split's documents (OPT) or pairs (T5), tokenised."""
    if family == "opt":
        return _encode(tokenizer, opt_documents(split, seed))
    sources, targets = zip(*t5_pairs(split, seed))
    return list(zip(_encode(tokenizer, list(sources)), _encode(tokenizer, list(targets))))


def _collate(family: str, tokenizer, examples) -> dict:
    if family == "opt":
        return _opt_batch(examples, tokenizer.eos_token_id, tokenizer.pad_token_id)
    sources, targets = zip(*examples)
    return _t5_batch(list(sources), list(targets), tokenizer.pad_token_id)


@torch.no_grad()
def heldout_nll(model, tokenizer, family: str, split, seed: int = 0, batch_size: int = 128) -> float:
    """Mean negative log-likelihood per token of the split's documents (OPT) or targets (T5)."""
    examples = _examples(family, tokenizer, split, seed)
    examples.sort(key=lambda e: len(e) if family == "opt" else len(e[0]) + len(e[1]))  # less padding
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        nll, n = _token_nll(model, family, _collate(family, tokenizer, examples[start:start + batch_size]))
        total, count = total + nll, count + n
    return total / count


def perplexity(model, tokenizer, family: str, split, seed: int = 0) -> float:
    """exp(mean NLL per token): how well the LLM predicts the held-out split's text."""
    return math.exp(heldout_nll(model, tokenizer, family, split, seed))


# ----------------------------------------------------------------------------- pretraining


def _opt_sampler(documents: list[list[int]], eos_id: int, pad_id: int, batch_size: int):
    def sample(rng: torch.Generator) -> dict:
        chosen = torch.randint(len(documents), (batch_size,), generator=rng).tolist()
        return _opt_batch([documents[i] for i in chosen], eos_id, pad_id, rng)

    return sample


def _t5_sampler(pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int):
    def sample(rng: torch.Generator) -> dict:
        chosen = torch.randint(len(pairs), (batch_size,), generator=rng).tolist()
        return _t5_batch([pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen], pad_id)

    return sample


def _lm_loss(model, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
    return {"loss": model(**batch).loss}


def pretrain_llm(family: str, dataset_dict, tokenizer, seed: int = 0, progress: bool = True,
                 config: TrainConfig | None = None):
    """Pretrain a fresh lite LLM on the training split's text (``LLM_TRAIN[family]`` unless
    ``config`` is given; ``seed`` overrides its seed). Validation: the val split's perplexity.

    Returns ``(model, history)``: the model in eval mode, and a dict with per-step ``losses`` and
    ``lr``, ``metrics`` (``val_loss``, ``val_perplexity``) at ``eval_steps``, and ``seconds``.
    """
    config = replace(config or LLM_TRAIN[family], seed=seed)
    model = build_llm(family, tokenizer, seed)
    examples = _examples(family, tokenizer, dataset_dict["train"], seed)
    if family == "opt":
        sampler = _opt_sampler(examples, tokenizer.eos_token_id, tokenizer.pad_token_id, config.batch_size)
    else:
        sampler = _t5_sampler(examples, tokenizer.pad_token_id, config.batch_size)
    val = dataset_dict["val"]

    def evaluate(m) -> dict[str, float]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):  # half the time; same to ~1e-4
            loss = heldout_nll(m, tokenizer, family, val)  # the same held-out text whatever the seed
        return {"val_loss": loss, "val_perplexity": math.exp(loss)}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:  # the loop's resume checkpoint: not needed after
        history = train(model, sampler, _lm_loss, config, run_dir, evaluate=evaluate, progress=progress)
    return model.eval(), {**asdict(history), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- cache


def text_digest(dataset_dict) -> str:
    """sha256 of the text the LLMs are trained and validated on (train and val): unlike
    ``data.fingerprint`` it skips decoding every image, which the LLMs never see."""
    digest = hashlib.sha256()
    for name in ("train", "val"):
        split = dataset_dict[name]
        for column in ("captions", "questions", "question_types", "answers"):
            digest.update(json.dumps([name, column, list(split[column])]).encode())
    return digest.hexdigest()


def llm_cache_dir(family: str, dataset_dict, root: str | Path | None = None) -> Path:
    """``root/llm/{family}-{digest}``, the digest covering everything the cached model depends on."""
    if family not in LLM_FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}; expected one of {LLM_FAMILIES}")
    key = (family, CORPUS_VERSION, VOCAB_SIZE, OPT_SEQ_LEN, DROPOUT, MODEL_SIZES[family], LLM_TRAIN[family],
           text_digest(dataset_dict))
    return Path(root or cache_root()) / "llm" / f"{family}-{config_digest(key)}"


def load_lite_llm(family: str, dataset_dict=None, root: str | Path | None = None, progress: bool = True):
    """The frozen lite LLM of ``family`` and its tokenizer, pretrained on first use and cached.

    The model is written with ``save_pretrained`` (safetensors) next to its tokenizer and the
    pretraining history (``history.json``), into a temporary folder that is renamed into place
    only when complete: an interrupted run never leaves a half-written cache behind.
    """
    from transformers.utils import logging

    from .data import load_shapes_world

    logging.disable_progress_bar()  # transformers' "Loading weights" bars would clutter the notebooks
    dataset_dict = dataset_dict if dataset_dict is not None else load_shapes_world(root, progress=progress)
    path = llm_cache_dir(family, dataset_dict, root)
    if not path.is_dir():
        tokenizer = train_tokenizer(dataset_dict["train"])
        model, history = pretrain_llm(family, dataset_dict, tokenizer, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            Path(tmp, "history.json").write_text(json.dumps(history))
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a concurrent run that finished first: a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    model = MODEL_CLASSES[family].from_pretrained(path)
    return freeze(model), PreTrainedTokenizerFast.from_pretrained(path)


def load_llm_history(family: str, dataset_dict=None, root: str | Path | None = None) -> dict:
    """The pretraining history saved with a cached lite LLM (``load_lite_llm`` must have run)."""
    from .data import load_shapes_world

    dataset_dict = dataset_dict if dataset_dict is not None else load_shapes_world(root, progress=False)
    return json.loads((llm_cache_dir(family, dataset_dict, root) / "history.json").read_text())


# ----------------------------------------------------------------------------- generation and text-only VQA


@torch.no_grad()
def generate_text(model, tokenizer, family: str, prompts: list[str], max_new_tokens: int = 10,
                  batch_size: int = 128) -> list[str]:
    """Greedy continuations of ``prompts`` (OPT) or outputs for them as encoder inputs (T5)."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        # Decoder-only generation continues each row from its last token: pad on the left.
        side = "left" if family == "opt" else "right"
        batch = tokenizer(prompts[start:start + batch_size], padding=True, padding_side=side, return_tensors="pt")
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if family == "opt":
            ids = ids[:, batch["input_ids"].shape[1]:]  # drop the prompt
        outputs += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return outputs


def vqa_prompts(split, family: str, context: bool = True, seed: int = 0) -> tuple[list[str], list[list[str]], list[str]]:
    """Per question of the split: the family's VQA prompt (after a random caption of the image if
    ``context``, as in pretraining), its ten answers, and its question type."""
    prompts, answers, types = [], [], []
    for caption, question, ten, qtype in _qa_with_context(split, random.Random(seed)):
        prompt = PROMPTS[f"vqa_{family}"].format(question)
        prompts.append(f"{caption} {prompt}" if context else prompt)
        answers.append(ten)
        types.append(qtype)
    return prompts, answers, types


def text_vqa_accuracy(model, tokenizer, family: str, split, context: bool = True, seed: int = 0) -> dict[str, float]:
    """VQAv2 accuracy (percent) of the text-only LLM's greedy answers, per question type and overall.

    With ``context`` the LLM reads one caption of the image first (what pretraining taught it to
    use); without it, only the question: its language prior, the floor that stage 2 must beat.
    """
    prompts, answers, types = vqa_prompts(split, family, context, seed)
    predictions = generate_text(model, tokenizer, family, prompts, max_new_tokens=5)
    return vqa_scores([p.strip() for p in predictions], answers, types)


def plot_llm_history(histories: dict[str, dict]):
    """Training loss and held-out perplexity of each family's pretraining. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 3.6))
    for family, history in histories.items():
        ax_loss.plot(history["steps"], history["losses"]["loss"], label=family)
        ax_ppl.plot(history["eval_steps"], history["metrics"]["val_perplexity"], marker="o", label=family)
    ax_loss.set(xlabel="step", ylabel="loss", title="LLM pretraining loss (text only)")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="held-out (val) perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.legend()
    fig.tight_layout()
    return fig
