import pytest
import torch

from blip2_lite.masks import attention_mask, draw_mask, itc_mask, itg_mask, itm_mask


def random_padding(batch, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return (torch.arange(length)[None] < lengths[:, None]).long()


@pytest.mark.parametrize("num_queries,text_len", [(0, 5), (1, 1), (3, 7), (32, 12)])
def test_mask_structure(num_queries, text_len):
    text_mask = random_padding(4, text_len, seed=text_len)
    q = num_queries
    itc, itm, itg = (f(q, text_mask) for f in (itc_mask, itm_mask, itg_mask))
    length = q + text_len
    for mask in (itc, itm, itg):
        assert mask.shape == (4, length, length) and mask.dtype == torch.bool
        padded = torch.cat([torch.zeros(4, q, dtype=torch.bool), text_mask == 0], dim=1)
        assert not mask.transpose(1, 2)[padded].any(), "a padded key is attended"
        assert mask.any(dim=-1).all(), "a row attends to nothing"
    # ITC: queries and text never meet; ITM: all valid keys are visible.
    assert not itc[:, :q, q:].any() and not itc[:, q:, :q].any()
    valid_keys = torch.cat([torch.ones(4, q, dtype=torch.bool), text_mask.bool()], dim=1)
    assert torch.equal(itm, valid_keys[:, None, :].expand(-1, length, -1))
    # ITG: queries see only queries; text sees every query and no later text.
    assert itg[:, :q, :q].all() and not itg[:, :q, q:].any()
    assert itg[:, q:, :q].all()
    assert not itg[:, q:, q:].triu(diagonal=1).any()
    assert torch.equal(itg[:, q:, q:], itg[:, q:, q:].tril() & text_mask.bool()[:, None, :])


def test_left_padded_text_alone_keeps_every_row_valid():
    mask = itg_mask(0, torch.tensor([[0, 1, 1]]))
    assert mask.any(dim=-1).all()
    assert mask[0, 0].tolist() == [True, False, False]  # the lone padded row sees only itself


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown mask kind"):
        attention_mask("causal", 2, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[batch, text_len\]"):
        itm_mask(2, torch.ones(3))
    with pytest.raises(ValueError, match="at least one non-padded token"):
        itm_mask(2, torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="square"):
        draw_mask(torch.ones(2, 3, dtype=torch.bool), 1)


def test_draw_mask_shows_the_mask():
    import matplotlib

    matplotlib.use("Agg")
    mask = itg_mask(3, torch.tensor([[1, 1, 1, 0]]))
    ax = draw_mask(mask, 3, title="ITG")
    image = ax.get_images()[0].get_array()
    assert torch.equal(torch.as_tensor(image.data) > 0, mask[0])
