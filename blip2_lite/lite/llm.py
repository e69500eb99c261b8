"""The frozen language models of the lite world: a small OPT and a small FlanT5-style T5, pretrained
on the training split's text (``llm_text``), frozen, and cached.

``load_lite_llm`` trains once and caches each model under ``cache_root()/llm/{family}-{digest}``,
the digest covering the corpus, sizes and training budget (``presets``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import OPTConfig, PreTrainedTokenizerFast, T5Config

from ..atomic import atomic_path
from ..decoder_prompts import generate_by_prompt_length, pad_right
from ..devices import autocast
from ..evaluate.vqa import vqa_scores
from ..families import llm_family
from ..train import TrainConfig, train
from .llm_text import (
    CORPUS_VERSION,
    collate,
    encode,
    opt_sampler,
    qa_with_context,
    t5_encoder_batch,
    t5_sampler,
    tokenized_examples,
    train_tokenizer,
)
from .paths import cache_root
from .presets import (
    LLM_ATTENTION,
    LLM_DROPOUT,
    LLM_SIZES,
    LLM_TRAIN,
    LLM_VOCAB_SIZE,
    OPT_SEQ_LEN,
    config_digest,
)
from .shapes_world import load_shapes_world

# ----------------------------------------------------------------------------- models


def lite_llm_config(family: str, tokenizer) -> OPTConfig | T5Config:
    """A small OPT or FlanT5-style T5 config over ``tokenizer``'s vocabulary."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if not llm_family(family).encoder_decoder:
        return OPTConfig(vocab_size=len(tokenizer), max_position_embeddings=OPT_SEQ_LEN, do_layer_norm_before=True,
                         word_embed_proj_dim=LLM_SIZES["opt"]["hidden_size"], dropout=LLM_DROPOUT,
                         bos_token_id=tokenizer.eos_token_id, attn_implementation=LLM_ATTENTION, **ids,
                         **LLM_SIZES["opt"])
    return T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    dropout_rate=LLM_DROPOUT, decoder_start_token_id=tokenizer.pad_token_id,
                    attn_implementation=LLM_ATTENTION, **ids, **LLM_SIZES["t5"])


def build_llm(family: str, tokenizer, seed: int = 0):
    """A freshly initialised lite LLM (seeded)."""
    torch.manual_seed(seed)
    model = llm_family(family).model_class()(lite_llm_config(family, tokenizer))
    if model.config.is_encoder_decoder:
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


# ----------------------------------------------------------------------------- likelihood


def _token_nll(model, family: str, batch: dict) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens, and their number."""
    labels = batch["labels"]
    if llm_family(family).encoder_decoder:
        logits = model(**batch).logits  # the labels, shifted right, are the decoder's inputs
    else:  # position t predicts token t + 1
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        labels = labels[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll.item(), int((labels != -100).sum())


@torch.no_grad()
def heldout_nll(model, tokenizer, family: str, split, seed: int = 0, batch_size: int = 128) -> float:
    """Mean negative log-likelihood per token of the split's documents (OPT) or targets (T5)."""
    examples = tokenized_examples(family, tokenizer, split, seed)
    seq2seq = llm_family(family).encoder_decoder
    examples.sort(key=lambda e: sum(map(len, e)) if seq2seq else len(e))  # less padding
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        nll, n = _token_nll(model, family, collate(family, tokenizer, examples[start:start + batch_size]))
        total, count = total + nll, count + n
    return total / count


def perplexity(model, tokenizer, family: str, split, seed: int = 0) -> float:
    """exp(mean NLL per token): how well the LLM predicts the held-out split's text."""
    return math.exp(heldout_nll(model, tokenizer, family, split, seed))


# ----------------------------------------------------------------------------- pretraining


# The validation curve reads the text of this many val scenes (of 300): an evaluation of OPT over
# all of them took 9 s on 2 cores, three of them a sixth of its pretraining
HELDOUT_SCENES = 100


def _lm_loss(model, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
    return {"loss": model(**batch).loss}


def pretrain_llm(family: str, dataset_dict, tokenizer, seed: int = 0, progress: bool = True,
                 config: TrainConfig | None = None):
    """Pretrain a fresh lite LLM on the training split's text (``LLM_TRAIN[family]`` unless
    ``config`` is given; ``seed`` overrides its seed). Validation: the perplexity of the text of the
    first ``HELDOUT_SCENES`` val scenes.

    Returns ``(model, history)``: the model in eval mode, and a dict with per-step ``losses`` and
    ``lr``, ``metrics`` (``val_loss``, ``val_perplexity``) at ``eval_steps``, and ``seconds``.
    """
    config = replace(config or LLM_TRAIN[family], seed=seed)
    model = build_llm(family, tokenizer, seed)
    examples = tokenized_examples(family, tokenizer, dataset_dict["train"], seed)
    if llm_family(family).encoder_decoder:
        sampler = t5_sampler(examples, tokenizer.pad_token_id, config.batch_size)
    else:
        sampler = opt_sampler(examples, tokenizer.eos_token_id, tokenizer.pad_token_id, config.batch_size)
    heldout = dataset_dict["val"].select(range(min(HELDOUT_SCENES, len(dataset_dict["val"]))))

    def evaluate(m) -> dict[str, float]:
        with autocast(m.device, config.bf16):  # half the time on a CPU; same to ~1e-4
            loss = heldout_nll(m, tokenizer, family, heldout)  # the same held-out text whatever the seed
        return {"val_loss": loss, "val_perplexity": math.exp(loss)}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:  # the loop's resume checkpoint: not needed after
        history = train(model, sampler, _lm_loss, config, run_dir, evaluate=evaluate, progress=progress)
    return model.eval(), {**asdict(history), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- cache


def text_digest(dataset_dict) -> str:
    """sha256 of the text the LLMs are trained and validated on (train and val): unlike
    ``shapes_world.fingerprint`` it skips decoding every image, which the LLMs never see."""
    digest = hashlib.sha256()
    for name in ("train", "val"):
        split = dataset_dict[name]
        for column in ("captions", "questions", "question_types", "answers"):
            digest.update(json.dumps([name, column, list(split[column])]).encode())
    return digest.hexdigest()


def llm_cache_dir(family: str, dataset_dict, root: str | Path | None = None, seed: int = 0) -> Path:
    """``root/llm/{family}-{digest}``, the digest covering everything the cached model depends on,
    its pretraining ``seed`` included."""
    llm_family(family)  # an unknown family fails here
    key = (family, CORPUS_VERSION, LLM_VOCAB_SIZE, OPT_SEQ_LEN, LLM_DROPOUT, LLM_ATTENTION, LLM_SIZES[family],
           LLM_TRAIN[family], seed, text_digest(dataset_dict))
    return Path(root or cache_root()) / "llm" / f"{family}-{config_digest(key)}"


def load_lite_llm(family: str, dataset_dict=None, root: str | Path | None = None, progress: bool = True,
                  seed: int = 0):
    """The frozen lite LLM of ``family`` and its tokenizer, pretrained (with ``seed``) on first use and cached.

    The model is written with ``save_pretrained`` (safetensors) next to its tokenizer and the
    pretraining history (``history.json``), into a temporary folder that is renamed into place
    only when complete: an interrupted run never leaves a half-written cache behind.
    """
    from transformers.utils import logging

    logging.disable_progress_bar()  # transformers' "Loading weights" bars would clutter the notebooks
    dataset_dict = dataset_dict if dataset_dict is not None else load_shapes_world(root, progress=progress)
    path = llm_cache_dir(family, dataset_dict, root, seed)
    if not path.is_dir():
        tokenizer = train_tokenizer(dataset_dict["train"])
        model, history = pretrain_llm(family, dataset_dict, tokenizer, seed=seed, progress=progress)
        with atomic_path(path, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "history.json").write_text(json.dumps(history))
    # config.json does not keep the attention implementation: name it again
    model = llm_family(family).model_class().from_pretrained(path, attn_implementation=LLM_ATTENTION)
    return freeze(model), PreTrainedTokenizerFast.from_pretrained(path)


def load_llm_history(family: str, dataset_dict=None, root: str | Path | None = None, seed: int = 0) -> dict:
    """The pretraining history saved with a cached lite LLM (``load_lite_llm`` must have run)."""
    dataset_dict = dataset_dict if dataset_dict is not None else load_shapes_world(root, progress=False)
    return json.loads((llm_cache_dir(family, dataset_dict, root, seed) / "history.json").read_text())


# ----------------------------------------------------------------------------- generation and text-only VQA


@torch.no_grad()
def generate_text(model, tokenizer, family: str, prompts: list[str], max_new_tokens: int = 10,
                  batch_size: int = 128, decoder_prompts: list[str] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (OPT), or T5's outputs for ``prompts`` as its encoder's
    input, its decoder starting from ``decoder_prompts`` when given (left out of the outputs)."""
    kind = llm_family(family)
    if decoder_prompts is not None and (not kind.encoder_decoder or len(decoder_prompts) != len(prompts)):
        raise ValueError(f"decoder_prompts are for an encoder-decoder LLM, one per prompt: got {len(decoder_prompts)} "
                         f"for {len(prompts)} prompts to {family}")
    encoded = encode(tokenizer, prompts)
    starts = encode(tokenizer, decoder_prompts) if decoder_prompts is not None else [[] for _ in prompts]
    # rows in order of length, so that a batch pads little (two thirds of the time for the test
    # questions after their captions, the same answers) and mostly shares its decoder prompts' length
    order = sorted(range(len(prompts)), key=lambda i: (len(starts[i]), len(encoded[i])))
    pad = tokenizer.pad_token_id
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                   eos_token_id=tokenizer.eos_token_id)
    outputs = [""] * len(prompts)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        if kind.encoder_decoder:  # the encoder's input built as in pretraining
            encoder = {k: v.to(model.device) for k, v in t5_encoder_batch([encoded[i] for i in rows], pad).items()}
            new_ids = generate_by_prompt_length(
                model.generate, lambda group: {k: v[group] for k, v in encoder.items()},
                [starts[i] for i in rows], pad, model.device, **options)  # T5's decoder starts from its pad
            new_ids = pad_right(new_ids, pad)
        else:
            batch = tokenizer([prompts[i] for i in rows], padding=True, padding_side=kind.padding_side,
                              return_tensors="pt").to(model.device)
            new_ids = model.generate(**batch, **options)
            new_ids = new_ids[:, batch["input_ids"].shape[1]:]  # drop the prompt
        for i, text in zip(rows, tokenizer.batch_decode(new_ids, skip_special_tokens=True)):
            outputs[i] = text
    return outputs


def vqa_prompts(split, family: str, context: bool = True, seed: int = 0):
    """Per question of the split, what the LLM reads as in its pretraining: OPT the family's VQA
    prompt after a caption of the image that tells the answer (if ``context``); T5 that caption (or
    nothing) in its encoder and the prompt at the start of its decoder. Returns ``(prompts,
    decoder_prompts, answers, types)``; ``decoder_prompts`` is None for a decoder-only LLM."""
    kind = llm_family(family)
    prompts, decoder_prompts, answers, types = [], [], [], []
    for caption, question, ten, qtype in qa_with_context(split, random.Random(seed)):
        prompt = kind.vqa_prompt.format(question)
        if kind.encoder_decoder:
            prompts.append(caption if context else "")
            decoder_prompts.append(prompt)
        else:
            prompts.append(f"{caption} {prompt}" if context else prompt)
        answers.append(ten)
        types.append(qtype)
    return prompts, (decoder_prompts if kind.encoder_decoder else None), answers, types


def text_vqa_accuracy(model, tokenizer, family: str, split, context: bool = True, seed: int = 0) -> dict[str, float]:
    """VQAv2 accuracy (percent) of the text-only LLM's greedy answers, per question type and overall.

    With ``context`` the LLM first reads a caption of the image that tells the answer (what
    pretraining taught it to use); without it, only the question: its language prior, the floor
    that stage 2 must beat.
    """
    prompts, decoder_prompts, answers, types = vqa_prompts(split, family, context, seed)
    # each distinct input decoded once: without context the test split's 3,000 questions are 178 texts
    inputs = list(zip(prompts, decoder_prompts or [None] * len(prompts)))
    distinct = list(dict.fromkeys(inputs))
    texts, decoder_texts = (list(column) for column in zip(*distinct))
    generated = generate_text(model, tokenizer, family, texts, max_new_tokens=5,
                              decoder_prompts=decoder_texts if decoder_prompts is not None else None)
    answer_of = dict(zip(distinct, generated))
    return vqa_scores([answer_of[x].strip() for x in inputs], answers, types)


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
