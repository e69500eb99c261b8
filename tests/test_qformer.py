"""The mask equivalences the paper's implementation relies on, and clear errors for bad input."""

import pytest
import torch

from blip2_lite import QFormer

from tiny import WIDTH, tiny_batch, tiny_config, tiny_model

ATOL = 1e-5


@pytest.fixture(params=[1, 2], ids=["cross-every-layer", "cross-every-2nd"])
def qformer(request):
    torch.manual_seed(0)
    return QFormer(tiny_config(cross_attention_freq=request.param)).eval()


def test_itc_joint_pass_equals_two_separate_passes(qformer):
    features, ids, mask = tiny_batch()
    with torch.no_grad():
        joint = qformer(ids, mask, features, mask="itc")
        image_only = qformer(image_embeds=features)
        text_only = qformer(ids, mask, use_queries=False)
    torch.testing.assert_close(joint.query_output, image_only.query_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(joint.text_output, text_only.text_output, atol=ATOL, rtol=0)


def test_itg_reusing_query_keys_values_equals_joint_causal_pass(qformer):
    features, ids, mask = tiny_batch()
    with torch.no_grad():
        joint = qformer(ids, mask, features, mask="itg")
        image_pass = qformer(image_embeds=features)
        reused = qformer(ids, mask, mask="itg", query_past=image_pass.query_past)
    torch.testing.assert_close(reused.text_output, joint.text_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(image_pass.query_output, joint.query_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("t", [1, 3, 5])
def test_itg_text_never_sees_later_tokens(qformer, t):
    features, ids, mask = tiny_batch()
    mask = torch.ones_like(mask)  # perturb real tokens, not padding
    perturbed = ids.clone()
    perturbed[:, t:] = torch.randint(1, 50, perturbed[:, t:].shape, generator=torch.Generator().manual_seed(t))
    assert not torch.equal(perturbed, ids)
    with torch.no_grad():
        before = qformer(ids, mask, features, mask="itg")
        after = qformer(perturbed, mask, features, mask="itg")
        bidirectional = qformer(perturbed, mask, features, mask="itm")
    torch.testing.assert_close(after.query_output, before.query_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(after.text_output[:, :t], before.text_output[:, :t], atol=ATOL, rtol=0)
    # the check has teeth: the same perturbation does reach earlier positions without the causal mask
    assert not torch.allclose(bidirectional.text_output[:, :t], before.text_output[:, :t], atol=1e-3)


def test_padding_does_not_change_real_positions(qformer):
    features, ids, mask = tiny_batch(batch=2, length=6)
    mask[:] = 1
    mask[:, 4:] = 0
    with torch.no_grad():
        padded = qformer(ids, mask, features, mask="itm")
        trimmed = qformer(ids[:, :4], mask[:, :4], features, mask="itm")
    torch.testing.assert_close(padded.query_output, trimmed.query_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded.text_output[:, :4], trimmed.text_output, atol=ATOL, rtol=0)


def test_explicit_attention_equals_pytorch_fused_kernel():
    """The CPU path (product-softmax-product by hand) against ``F.scaled_dot_product_attention``."""
    from blip2_lite.qformer_layer import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 8, generator=gen) for n in (6, 9, 9))
    mask = torch.rand(3, 6, 9, generator=gen) > 0.4
    mask[..., 0] = True  # every row attends somewhere
    for m in (None, mask):
        fused, no_weights = attention(q, k, v, m, explicit=False)
        explicit, weights = attention(q, k, v, m, explicit=True)
        assert no_weights is None and weights.shape == (3, 4, 6, 9)
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert (weights[~mask[:, None].expand_as(weights)] == 0).all()


def test_attention_weights_are_returned_and_match_the_plain_pass(qformer):
    features, ids, mask = tiny_batch()
    with torch.no_grad():
        plain = qformer(ids, mask, features, mask="itg")
        explicit = qformer(ids, mask, features, mask="itg", output_attentions=True)
    torch.testing.assert_close(explicit.last_hidden_state, plain.last_hidden_state, atol=ATOL, rtol=0)
    cfg = qformer.config
    assert len(explicit.self_attentions) == cfg.num_layers
    assert len(explicit.cross_attentions) == sum(cfg.has_cross_attention(i) for i in range(cfg.num_layers))
    q, length = cfg.num_query_tokens, cfg.num_query_tokens + ids.shape[1]
    assert explicit.self_attentions[0].shape == (len(ids), cfg.num_heads, length, length)
    assert explicit.cross_attentions[0].shape == (len(ids), cfg.num_heads, q, features.shape[1])
    torch.testing.assert_close(explicit.cross_attentions[0].sum(-1), torch.ones(len(ids), cfg.num_heads, q))
    # masked entries get exactly zero weight
    assert (explicit.self_attentions[0][:, :, :q, q:] == 0).all()


def test_bad_inputs_raise_clear_errors(qformer):
    features, ids, mask = tiny_batch()
    cfg = qformer.config
    with pytest.raises(ValueError, match="encoder_width"):
        qformer(image_embeds=torch.randn(2, 7, WIDTH + 1))
    with pytest.raises(ValueError, match="position table"):
        long_ids = torch.ones(1, cfg.max_position_embeddings + 1, dtype=torch.long)
        qformer(long_ids, use_queries=False)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        qformer(ids, mask, features[:2])
    with pytest.raises(ValueError, match="does not match input_ids"):
        qformer(ids, mask[:, :-1], features)
    with pytest.raises(ValueError, match="self-attention mask must be"):
        qformer(ids, mask, features, mask=torch.ones(len(ids), 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs image_embeds"):
        qformer(ids, mask)
    with pytest.raises(ValueError, match="image_index"):
        qformer(ids, mask, features, image_index=torch.full((len(ids),), len(features)))
    with pytest.raises(ValueError, match="at least one non-padded token"):
        qformer(ids, torch.zeros_like(mask), use_queries=False)


def test_stage1_bad_inputs_raise_clear_errors():
    model = tiny_model()
    features, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="mismatched batch"):
        model(ids[:3], mask[:3], image_features=features)
    with pytest.raises(ValueError, match=r"\[batch >= 1, tokens >= 1, 24\]"):
        model(ids, mask, image_features=features[..., :-1])
    with pytest.raises(ValueError, match="no image_encoder"):
        model(ids, mask, images=torch.randn(6, 3, 8, 8))
    with pytest.raises(ValueError, match="at least two different images"):
        model(ids[:1], mask[:1], image_features=features[:1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        type(model)(tiny_config(), dec_token_id=10_000)


def test_frozen_image_encoder_gets_no_gradient_and_stays_in_eval():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(16, WIDTH), torch.nn.Dropout(0.5))
    model = type(tiny_model())(tiny_config(), dec_token_id=tiny_config().vocab_size - 1, image_encoder=encoder)
    model.train()
    assert not encoder.training
    _, ids, mask = tiny_batch(batch=4)
    images = torch.randn(4, 7, 4, 4)  # [B, tokens, 4x4] -> flattened to 16 per token
    model(ids, mask, images=images).loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert model.qformer.query_tokens.grad is not None
