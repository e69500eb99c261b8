"""A training run at full scale, described by a TOML file, and the models it builds.

The files in ``configs/`` are the paper's runs (section 3.4): stage 1 with ViT-g and a BERT-base
Q-Former, stage 2 with OPT-2.7B or FlanT5-XL. A file has three tables: ``[model]`` (``ModelConfig``),
``[train]`` (``train.TrainConfig``: steps, batch size per process, schedule) and ``[data]``
(``DataConfig``). Unknown keys are errors, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..train import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    # The frozen image encoder: "eva_vit_g" (BLIP-2's EVA-CLIP ViT-g, 39 blocks; its weights from
    # `image_encoder_weights`, a Salesforce BLIP-2 checkpoint folder or hub id), or any timm model name
    # (ImageNet weights when `image_encoder_weights` = "timm", random when empty).
    image_encoder: str = "eva_vit_g"
    image_encoder_weights: str = ""
    image_size: int = 224
    feature_layer: int = -2  # timm encoders: which block's output (-2: the second-to-last, as BLIP-2)
    frozen_dtype: str = "float16"  # the frozen image encoder's weights (the paper: fp16)
    # The Q-Former: initialised from this BERT (hub id, local folder, or "minilm", which ships offline),
    # or "random" with the sizes in `qformer` (QFormerConfig fields; the tokenizer is then `tokenizer`'s).
    qformer_init: str = "bert-base-uncased"
    qformer: dict = field(default_factory=dict)
    tokenizer: str = ""  # the Q-Former's WordPiece tokenizer; empty: the one of qformer_init
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    embed_dim: int = 256
    max_text_length: int = 32
    losses: tuple[str, ...] = ("itc", "itm", "itg")  # stage 1
    # Stage 2: the frozen LLM (hub id or folder, OPT or T5 family) and the stage-1 run to start from
    # (its run folder; empty: the Q-Former skips stage 1, the paper's Figure 5 ablation).
    llm: str = ""
    llm_dtype: str = "float16"  # the paper: fp16, but bfloat16 for FlanT5 (fp16 overflows in T5)
    stage1_run: str = ""
    task: str = "caption"  # stage 2: "caption" (COCO-format data) or "vqa" (VQAv2-format data)

    def __post_init__(self):
        for name in ("frozen_dtype", "llm_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if not set(self.losses) <= {"itc", "itm", "itg"} or "itc" not in self.losses:
            raise ValueError(f"losses must include 'itc' and be among itc, itm, itg, got {list(self.losses)}")
        if self.task not in ("caption", "vqa"):
            raise ValueError(f"task must be 'caption' or 'vqa', got {self.task!r}")


@dataclass(frozen=True)
class DataConfig:
    num_workers: int = 8  # DataLoader processes per training process, decoding and augmenting images
    min_scale: float = 0.5  # random resized crop keeps 50-100% of the image (LAVIS)
    vqa_split: str = "train2014"  # VQAv2 image names: COCO_{split}_{id:012d}.jpg
    # A folder for frozen features computed once (whole images, no augmentation; feature_cache.py).
    # Empty: images are decoded and augmented at every step, as in the paper.
    feature_cache: str = ""


@dataclass(frozen=True)
class RunConfig:
    stage: int
    model: ModelConfig
    train: TrainConfig
    data: DataConfig


def _table(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    if unknown := set(values) - known:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if "betas" in values or "losses" in values:  # TOML arrays arrive as lists
        values = {k: tuple(v) if k in ("betas", "losses") else v for k, v in values.items()}
    return cls(**values)


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: a path, or the name of one in ``configs/`` (e.g. "stage1_vitg")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.toml"
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise FileNotFoundError(f"no config file {name_or_path!r}: pass a path, or one of {names}")


def load_config(name_or_path: str | Path) -> RunConfig:
    path = resolve_config(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from e
    if unknown := set(raw) - {"stage", "model", "train", "data"}:
        raise ValueError(f"{path}: unknown tables or keys {sorted(unknown)}; expected stage, [model], [train], [data]")
    if raw.get("stage") not in (1, 2):
        raise ValueError(f"{path}: 'stage' must be 1 or 2, got {raw.get('stage')!r}")
    if "train" not in raw:
        raise ValueError(f"{path}: a [train] table (steps, batch_size, ...) is required")
    try:
        config = RunConfig(raw["stage"], _table(ModelConfig, raw.get("model", {}), f"{path} [model]"),
                           _table(TrainConfig, raw["train"], f"{path} [train]"),
                           _table(DataConfig, raw.get("data", {}), f"{path} [data]"))
    except TypeError as e:  # e.g. a missing required TrainConfig field
        raise ValueError(f"{path}: {e}") from e
    if config.stage == 2 and not config.model.llm:
        raise ValueError(f"{path}: stage 2 needs [model] llm (a hub id or folder of an OPT or T5 model)")
    return config
