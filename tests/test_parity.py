"""blip2_lite's Q-Former and stage-1 heads equal transformers' BLIP-2 on the same weights."""

import pytest
import torch

from blip2_lite.convert.engine import CheckpointError, load_strict
from blip2_lite.convert.hf import load_hf_qformer, load_hf_retrieval
from blip2_lite.losses import itc_similarity

from hf_tiny import ENCODER_WIDTH, padded_text, tiny_qformer, tiny_retrieval

TOL = 1e-5
CONFIGS = [  # (layers, cross-attention frequency, queries): odd counts on purpose
    (3, 1, 5),
    (3, 2, 7),
    (2, 2, 4),
]


@pytest.mark.parametrize("num_layers,freq,num_queries", CONFIGS)
def test_qformer_query_outputs_match_transformers(tmp_path, num_layers, freq, num_queries):
    reference = tiny_qformer(tmp_path, num_layers, freq)
    ours = load_hf_qformer(tmp_path, num_query_tokens=num_queries).eval()
    image = torch.randn(3, 9, ENCODER_WIDTH)
    with torch.no_grad():
        ours.query_tokens.normal_()
        expected = reference(query_embeds=ours.query_tokens.expand(3, -1, -1), encoder_hidden_states=image)
        got = ours(image_embeds=image)
    torch.testing.assert_close(got.query_output, expected.last_hidden_state, atol=TOL, rtol=0)


@pytest.fixture(params=CONFIGS, ids=lambda c: f"layers{c[0]}-freq{c[1]}-q{c[2]}")
def retrieval_pair(request, tmp_path):
    num_layers, freq, num_queries = request.param
    reference = tiny_retrieval(tmp_path, num_layers, freq, num_queries)
    ours, vision_state = load_hf_retrieval(tmp_path)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        vision_out = reference.vision_model(pixel_values=pixels, output_hidden_states=True)
    # blip2_lite's frozen encoder produces features *before* the vision LayerNorm (ln_vision).
    features = vision_out.hidden_states[-1]
    torch.testing.assert_close(reference.vision_model.post_layernorm(features), vision_out.last_hidden_state)
    return reference, ours.eval(), vision_state, pixels, features


def test_retrieval_checkpoint_returns_the_vision_tower(retrieval_pair):
    reference, _, vision_state, _, _ = retrieval_pair
    expected = {k for k in reference.state_dict() if k.startswith("vision_model.") and "post_layernorm" not in k}
    assert {f"vision_model.{k}" for k in vision_state} == expected


def test_query_outputs_match(retrieval_pair):
    reference, ours, _, _, features = retrieval_pair
    with torch.no_grad():
        image_embeds = ours.image_embeds(image_features=features)
        expected = reference.qformer(
            query_embeds=reference.query_tokens.expand(len(features), -1, -1),
            encoder_hidden_states=reference.vision_model.post_layernorm(features),
        ).last_hidden_state
        got = ours.qformer(image_embeds=image_embeds).query_output
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_itc_scores_match_raw_max_cosine(retrieval_pair):
    reference, ours, _, pixels, features = retrieval_pair
    ids, mask = padded_text(4, 8)  # 3 images x 4 texts, with padding
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        image_itc, _ = ours.itc_image(ours.image_embeds(image_features=features))
        got = itc_similarity(image_itc, ours.itc_text(ids, mask))
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_itm_logits_match(retrieval_pair):
    reference, ours, _, pixels, features = retrieval_pair
    ids, mask = padded_text(3, 8)
    with torch.no_grad():
        expected = reference(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
        ).logits_per_image
        got = ours.itm_logits(ours.image_embeds(image_features=features), ids, mask)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_itm_with_image_index_equals_repeated_images(retrieval_pair):
    """Computing image keys/values once per image and indexing them changes nothing."""
    _, ours, _, _, features = retrieval_pair
    ids, mask = padded_text(5, 8)
    index = torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        embeds = ours.image_embeds(image_features=features)
        indexed = ours.itm_logits(embeds, ids, mask, image_index=index)
        repeated = ours.itm_logits(embeds[index], ids, mask)
    torch.testing.assert_close(indexed, repeated, atol=TOL, rtol=0)


def test_strict_loading_lists_every_problem(tmp_path):
    tiny_retrieval(tmp_path, 2, 2, 4)
    model, _ = load_hf_retrieval(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "itm_head.bias"}
    state["qformer.not_a_param"] = torch.zeros(1)
    state["vision_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, state)
    message = str(err.value)
    assert "itm_head.bias" in message and "qformer.not_a_param" in message and "vision_proj.weight" in message
