"""Linear probes of frozen tokens: channel groups, the token under an object, the probe's accuracy."""

import pytest
import torch

from blip2_lite.encoders.timm_encoder import FrozenImageEncoder
from blip2_lite.lite.feature_probe import channel_groups, linear_probe, object_cell, object_tokens


def test_channel_groups_cover_the_tokens_in_order():
    encoder = FrozenImageEncoder(pretrained=False, image_size=64, pooled_stages=(1, 2, 3))
    groups = channel_groups(encoder)
    assert list(groups) == ["stride-4 stage", "stride-8 stage", "stride-16 stage", "final map"]
    assert [(g.start, g.stop) for g in groups.values()] == [(0, 24), (24, 64), (64, 176), (176, 1456)]
    assert encoder.feature_dim == 1456
    assert list(channel_groups(FrozenImageEncoder(pretrained=False, image_size=64)).values()) == [slice(0, 1280)]


def test_object_tokens_take_the_cell_under_each_centre():
    features = torch.arange(2 * 9 * 2, dtype=torch.float16).reshape(2, 9, 2)  # two 3 x 3 grids, 30 px cells
    objects = [[{"bbox": [0, 0, 20, 20], "color": "red"}],  # centre (10, 10): cell (0, 0)
               [{"bbox": [62, 30, 88, 58], "color": "blue"}, {"bbox": [30, 62, 58, 88], "color": "red"}]]
    tokens, rows = object_tokens(features, objects, image_size=90)
    assert tokens.dtype == torch.float32 and [r["color"] for r in rows] == ["red", "blue", "red"]
    torch.testing.assert_close(tokens, torch.stack([features[0, 0], features[1, 5], features[1, 7]]).float())
    with pytest.raises(ValueError, match="side"):
        object_tokens(features[:, :8], objects, image_size=90)


def test_object_cell_is_row_then_column_of_the_centre():
    obj = {"bbox": [62, 30, 88, 58]}  # centre x 75, y 44
    assert object_cell(obj, side=3, image_size=90) == (1, 2)
    assert object_cell(obj, side=7, image_size=224) == (1, 2)  # 32-px cells


def test_probe_reads_a_linear_code_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (600,), generator=gen)
    x = torch.randn(600, 20, generator=gen)
    x[:, 0] += 4 * labels  # the class is written along one direction
    names = ["red", "green", "blue"]
    y = [names[i] for i in labels]
    assert linear_probe(x[:400], y[:400], x[400:], y[400:]) > 0.95
    assert linear_probe(x[:400, 1:], y[:400], x[400:, 1:], y[400:]) < 0.5  # without it: chance (1/3)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x[:10], ["red"] * 10, x[10:20], ["red"] * 10)
