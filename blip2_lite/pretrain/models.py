"""The models a full-scale run trains, built from its ``ModelConfig``: the frozen image encoder, the
stage-1 model (Q-Former from BERT + ITC/ITM/ITG heads) and the stage-2 model (stage-1 Q-Former + a frozen LLM)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CHECKPOINT
from ..convert.bert import bert_tokenizer, qformer_from_bert
from ..convert.engine import read_torch_file
from ..convert.hf import read_hf_checkpoint
from ..convert.pretrained import eva_from_hf, resolve_checkpoint, salesforce_config
from ..encoders.eva import CLIP_MEAN, CLIP_STD, EvaVisionTower
from ..encoders.timm_encoder import FrozenImageEncoder
from ..qformer import QFormer, QFormerConfig
from ..stage1 import Blip2Stage1
from ..stage2 import Blip2
from .config import DTYPES, ModelConfig


def image_encoder(m: ModelConfig) -> tuple[nn.Module, tuple, tuple]:
    """The frozen encoder in ``frozen_dtype`` and the pixel statistics its weights expect (mean, std)."""
    if m.image_encoder == "eva_vit_g":
        if m.image_encoder_weights:
            config, state = read_hf_checkpoint(resolve_checkpoint(m.image_encoder_weights))
            encoder = eva_from_hf(config["vision_config"], state)
        else:  # random weights with ViT-g's architecture: for benchmarks, or to load weights yourself
            encoder = EvaVisionTower(salesforce_config("Salesforce/blip2-opt-2.7b").vision_config)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        encoder = FrozenImageEncoder(m.image_encoder, m.feature_layer, m.image_size,
                                     pretrained=m.image_encoder_weights == "timm")
        mean, std = tuple(encoder.mean.flatten().tolist()), tuple(encoder.std.flatten().tolist())
    if encoder.image_size != m.image_size:
        raise ValueError(f"{m.image_encoder} takes {encoder.image_size}px images, the config says {m.image_size}")
    return encoder.to(DTYPES[m.frozen_dtype]), mean, std


def stage1_model(m: ModelConfig, encoder: nn.Module):
    """(Blip2Stage1 over ``encoder``, its tokenizer): the Q-Former from BERT (or random) as the paper."""
    width = encoder.feature_dim
    if m.qformer_init == "random":
        tokenizer = bert_tokenizer(m.tokenizer or "minilm")
        sizes = dict(encoder_width=width, num_query_tokens=m.num_query_tokens,
                     cross_attention_freq=m.cross_attention_freq, vocab_size=len(tokenizer))
        qformer = QFormer(QFormerConfig(**(sizes | m.qformer)))
    else:
        if m.qformer:
            raise ValueError("[model] qformer sizes apply to qformer_init = 'random' only; a BERT brings its own")
        qformer, tokenizer = qformer_from_bert(m.qformer_init, m.num_query_tokens, width, m.cross_attention_freq)
        if m.tokenizer:
            tokenizer = bert_tokenizer(m.tokenizer)
    model = Blip2Stage1(qformer.config, tokenizer.bos_token_id, encoder, m.embed_dim, qformer=qformer,
                        itg="itg" in m.losses, itm="itm" in m.losses)
    return model, tokenizer


def language_model(m: ModelConfig):
    """(the frozen LLM in ``llm_dtype``, its tokenizer), OPT- or T5-like, from a hub id or folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(m.llm)
        kind = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        llm = kind.from_pretrained(m.llm, dtype=DTYPES[m.llm_dtype])
        tokenizer = AutoTokenizer.from_pretrained(m.llm)
    except OSError as e:  # not a folder, offline, unknown id
        raise OSError(f"cannot load the LLM {m.llm!r}: {e}") from e
    return llm, tokenizer


def stage2_model(m: ModelConfig, stage1: Blip2Stage1) -> Blip2:
    llm, tokenizer = language_model(m)
    return Blip2.from_stage1(stage1, llm, tokenizer)


def stage1_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a finished (or interrupted) stage-1 run."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no stage-1 checkpoint {path}: train stage 1 into {run_dir} first, or leave "
                                "[model] stage1_run empty to start stage 2 without stage 1")
    return read_torch_file(path, advice="train stage 1 again")["model"]
