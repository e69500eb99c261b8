"""A tiny blip2_lite configuration shared by the tests."""

import torch

from blip2_lite import Blip2Stage1, QFormerConfig

VOCAB = 60
DEC = VOCAB - 1
WIDTH = 24


def tiny_config(**overrides) -> QFormerConfig:
    sizes = dict(
        hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, encoder_width=WIDTH,
        num_query_tokens=5, vocab_size=VOCAB, max_position_embeddings=16,
    )
    return QFormerConfig(**{**sizes, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Blip2Stage1:
    torch.manual_seed(seed)
    return Blip2Stage1(tiny_config(**overrides), dec_token_id=DEC)


def tiny_batch(batch: int = 6, length: int = 9, patches: int = 7, seed: int = 0):
    """(image features, input ids, attention mask) with ragged padding."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, patches, WIDTH, generator=gen)
    ids = torch.randint(1, DEC, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, max(2, length - i % 4) :] = 0
    return features, ids.masked_fill(mask == 0, 0), mask
