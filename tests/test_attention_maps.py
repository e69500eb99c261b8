"""Cross-attention maps: the reshaping keeps rows and columns apart and drops exactly the prefix tokens,
the encoders report their grids, and on a synthetic frozen encoder whose features make the answer
known (one distinctive patch) every map of every layer, head and query peaks on that patch."""

import pytest
import torch
from PIL import Image

from blip2_lite import QFormer
from blip2_lite.attention_maps import (
    TokenGrid,
    cross_attention_maps,
    explore,
    itc_best_query,
    itm_gradcam,
    overlay,
    plot_maps,
    token_grid,
    word_maps,
)
from blip2_lite.encoders.eva import EvaVisionTower
from blip2_lite.losses import itc_similarity
from hf_tiny import vision_config
from tiny import tiny_batch, tiny_config, tiny_model


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_reshaping_keeps_rows_and_columns_and_drops_the_prefix(prefix):
    grid = TokenGrid(prefix, 3, 5)  # not square: a transposed reshape would show
    weights = torch.arange(grid.num_tokens, dtype=torch.float).expand(2, 4, grid.num_tokens)
    maps = grid.to_maps(weights)
    assert maps.shape == (2, 4, 3, 5)
    for row in range(3):
        for col in range(5):
            assert maps[1, 2, row, col] == prefix + 5 * row + col  # token index = prefix + row * width + col
    with pytest.raises(ValueError, match="prefix"):
        grid.to_maps(weights[..., 1:])


def test_encoders_report_their_grids():
    tower = EvaVisionTower(vision_config())
    config = vision_config()
    side = config.image_size // config.patch_size
    assert token_grid(tower) == TokenGrid(1, side, side)  # one CLS token, as ViT-g
    assert token_grid(tower).num_tokens == tower.num_tokens

    class LiteLike:  # the lite world's EfficientNet map: 49 tokens, no prefix
        num_tokens = 49

    assert token_grid(LiteLike()) == TokenGrid(0, 7, 7)
    with pytest.raises(TypeError, match="TokenGrid"):
        token_grid(object())


def synthetic_qformer(num_layers=3, cross_attention_freq=2):
    """A Q-Former whose every cross-attention reads one direction of the image features: its queries
    are the all-ones vector whatever the query, its keys are the features themselves."""
    torch.manual_seed(0)
    qformer = QFormer(tiny_config(num_layers=num_layers, cross_attention_freq=cross_attention_freq, encoder_width=32))
    with torch.no_grad():
        for layer in qformer.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.query.weight.zero_()
                layer.cross_attn.query.bias.fill_(1.0)
                layer.cross_attn.key.weight.copy_(torch.eye(32))
                layer.cross_attn.key.bias.zero_()
    return qformer.eval()


@pytest.mark.parametrize("grid", [TokenGrid(0, 3, 4), TokenGrid(1, 3, 4), TokenGrid(1, 5, 2)])
def test_every_map_peaks_on_the_distinctive_patch(grid):
    qformer = synthetic_qformer()
    targets = [(0, 0), (grid.height - 1, grid.width - 1), (1, grid.width // 2)]
    features = torch.zeros(len(targets), grid.num_tokens, 32)
    features[:, :grid.prefix] = -2.0  # a CLS token, distinct from the patches but away from the queries
    for i, (row, col) in enumerate(targets):
        features[i, grid.prefix + row * grid.width + col] = 2.0
    maps = cross_attention_maps(qformer, features, grid)
    assert maps.layers == [0, 2] and maps.maps.shape == (3, 2, 4, 5, grid.height, grid.width)
    for i, (row, col) in enumerate(targets):
        flat = maps.maps[i].flatten(-2).argmax(dim=-1)  # [layers, heads, queries]
        assert (flat == row * grid.width + col).all()
    if grid.prefix == 0:  # nothing dropped: each map is a whole softmax
        assert torch.allclose(maps.maps.sum(dim=(-1, -2)), torch.ones(3, 2, 4, 5))
    assert torch.equal(maps.layer(2), maps.maps[:, 1])
    with pytest.raises(ValueError, match="no cross-attention"):
        maps.layer(1)


def test_the_best_itc_query_decides_the_pair_score():
    model = tiny_model().eval()  # no dropout: both passes see the same network
    features, ids, mask = tiny_batch()
    embeds = model.image_embeds(image_features=features)
    best, cosines = itc_best_query(model, embeds, ids, mask)
    with torch.no_grad():
        image_itc, _ = model.itc_image(embeds)
        pair_scores = itc_similarity(image_itc, model.itc_text(ids, mask)).diagonal()
    assert torch.allclose(cosines.max(dim=-1).values, pair_scores, atol=1e-6)
    assert torch.equal(cosines.argmax(dim=-1), best)


def test_overlay_is_warm_where_the_map_peaks():
    image = Image.new("RGB", (70, 56), "gray")
    heat = torch.zeros(4, 5)
    heat[0, 4] = 1.0  # top right
    drawn = overlay(image, heat)
    assert drawn.shape == (56, 70, 3) and 0 <= drawn.min() and drawn.max() <= 1
    assert drawn[5, 65, 0] > drawn[50, 5, 0] and drawn[50, 5, 2] > drawn[5, 65, 2]  # red at the peak, blue far away
    with pytest.raises(ValueError, match="one"):
        overlay(image, heat[None])


def synthetic_stage1():
    """A tiny Blip2Stage1 around the synthetic Q-Former; values are the features themselves, so
    tokens whose features are 0 carry nothing to the queries."""
    model = tiny_model(encoder_width=32).eval()
    model.qformer.load_state_dict(synthetic_qformer().state_dict())
    with torch.no_grad():
        for layer in model.qformer.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.value.weight.copy_(torch.eye(32))
                layer.cross_attn.value.bias.zero_()
    return model


def test_gradcam_is_zero_where_the_image_carries_nothing_and_peaks_on_the_patch():
    model, grid = synthetic_stage1(), TokenGrid(1, 3, 4)
    features = torch.zeros(2, grid.num_tokens, 32)
    features[0, 1 + 1 * 4 + 2] = 2.0  # row 1, column 2
    features[1, 1 + 2 * 4 + 0] = 2.0  # row 2, column 0
    _, ids, mask = tiny_batch(batch=2)
    cams, logits = itm_gradcam(model, features, ids, mask, grid)
    assert cams.maps.shape == (2, 2, 1, 5, 3, 4) and logits.shape == (2, 2)
    with torch.no_grad():
        expected = model.itm_logits(features, ids, mask)
    assert torch.allclose(logits, expected, atol=1e-5)  # the same ITM pass
    for i, (row, col) in enumerate([(1, 2), (2, 0)]):
        total = cams.maps[i].sum(dim=(0, 1, 2))  # over layers, heads and queries
        assert total[row, col] > 0 and total.flatten().count_nonzero() == 1  # no gradient through zero values


def test_word_maps_reach_the_patch_through_the_queries():
    model, grid = synthetic_stage1(), TokenGrid(0, 2, 5)
    features = torch.zeros(3, grid.num_tokens, 32)
    targets = [(0, 4), (1, 1), (1, 3)]
    for i, (row, col) in enumerate(targets):
        features[i, row * grid.width + col] = 2.0
    _, ids, mask = tiny_batch(batch=3, length=6)
    maps = word_maps(model, features, ids, mask, grid)
    assert maps.shape == (3, 6, 2, 5)
    assert torch.allclose(maps.sum(dim=(-1, -2)), torch.ones(3, 6), atol=1e-5)  # a mixture of query maps
    for i, (row, col) in enumerate(targets):
        assert (maps[i].flatten(-2).argmax(dim=-1) == row * grid.width + col).all()


def test_plot_maps_draws_one_panel_per_map():
    image = Image.new("RGB", (32, 32), "white")
    fig = plot_maps(image, torch.rand(5, 3, 3), [f"q{i}" for i in range(5)], columns=4)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["q0", "q1", "q2", "q3", "q4"] and len(fig.axes) == 8
    with pytest.raises(ValueError, match="titles"):
        plot_maps(image, torch.rand(2, 3, 3), ["only one"])


def test_explore_offers_sliders_and_falls_back_to_one_view(monkeypatch):
    import matplotlib.pyplot as plt

    grid = TokenGrid(0, 3, 4)
    maps = cross_attention_maps(synthetic_qformer(), torch.rand(1, grid.num_tokens, 32), grid)
    image = Image.new("RGB", (24, 24), "white")
    viewer = explore(image, maps)
    assert {w.description for w in viewer.widget.children if hasattr(w, "description")} >= {"layer", "head", "query"}
    monkeypatch.setitem(__import__("sys").modules, "ipywidgets", None)  # as if ipywidgets were missing
    plt.close("all")
    assert explore(image, maps) is None and len(plt.get_fignums()) == 1  # the default view, drawn once
    plt.close("all")
