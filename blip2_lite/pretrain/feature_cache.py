"""Frozen image features computed once, for runs without augmentation (``[data] feature_cache``).

The image encoder is frozen, so without random crops an image's features never change: computing
them once and reading them back saves the encoder's forward pass (for ViT-g, most of a stage-1
step's compute) at the cost of disk (257 x 1408 fp16 values, 0.7 MB, per image). Each process
encodes its share of the images and writes one safetensors shard; readers memory-map the shards.
A cache remembers the encoder and image list it was built for and refuses any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json
from ..distributed import barrier, distributed_world, is_main
from ..encoders.images import load_image

META = "meta.json"


def _shard(folder: Path, rank: int, world: int) -> Path:
    return folder / f"shard-{rank:05d}-of-{world:05d}.safetensors"


@torch.no_grad()
def build_feature_cache(folder: str | Path, images: list[str], encoder, identity: dict, batch_size: int = 64,
                        device: str | torch.device = "cpu") -> Path:
    """Encode every image of ``images`` (whole image, the encoder's own ``preprocess``) into ``folder``.

    Collective under torchrun: rank r encodes images r, r + world, ... . ``identity`` (the encoder's
    settings) is kept in ``meta.json``; an existing cache of another identity or image list is an error.
    """
    folder = Path(folder)
    rank, world = distributed_world()
    meta = {"identity": identity, "images": len(images), "first": images[:3], "shards": world}
    if (folder / META).is_file():
        kept = json.loads((folder / META).read_text())
        if {k: kept.get(k) for k in ("identity", "images", "first")} != {k: meta[k] for k in ("identity", "images", "first")}:
            raise ValueError(f"the feature cache {folder} was built for another encoder or image list "
                             f"({kept['identity']}, {kept['images']} images): delete it or set another [data] feature_cache")
        return folder
    mine = list(range(rank, len(images), world))
    features = {}
    encoder = encoder.to(device)
    for start in tqdm(range(0, len(mine), batch_size), disable=not is_main(), desc="frozen features"):
        chunk = mine[start:start + batch_size]
        pixels = encoder.preprocess([load_image(images[i]) for i in chunk])
        out = encoder(pixels.to(device)).cpu()
        features.update({str(i): row.clone() for i, row in zip(chunk, out)})
    with atomic_path(_shard(folder, rank, world)) as tmp:
        save_file(features, tmp)
    barrier()
    if is_main():
        write_json(folder / META, meta)  # written last: a cache without it is incomplete
    barrier()
    return folder


class FeatureCache:
    """Read access to a built cache: ``cache[i]`` is image i's features ``[tokens, width]``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / META).read_text())
        self.files = [_shard(self.folder, r, meta["shards"]) for r in range(meta["shards"])]
        self.world = meta["shards"]
        self._handles = None  # opened lazily: DataLoader workers each open their own

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._handles is None:
            self._handles = [safe_open(str(f), framework="pt") for f in self.files]
        return self._handles[index % self.world].get_tensor(str(index))

    def __getstate__(self):
        return {**self.__dict__, "_handles": None}
