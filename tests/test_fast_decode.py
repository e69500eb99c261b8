"""The fast decode path (static KV cache, captured decode step) gives exactly the tokens of transformers'
``generate``: greedy and beam 5, OPT and T5, left-padded batches, repeated calls of changing shapes."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from blip2_lite.convert.pretrained import load_hf_blip2
from blip2_lite.fast_decode import InPlaceStaticCache, fast_decoding

from hf_tiny import tiny_conditional, word_tokenizer

NEW_TOKENS = 12


def tiny_llm(family: str):
    torch.manual_seed(0)
    if family == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                        num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                                        pad_token_id=1, eos_token_id=2, bos_token_id=2)).eval()
    return T5ForConditionalGeneration(T5Config(vocab_size=60, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def calls(model, num_beams: int, length_penalty: float) -> list[dict]:
    """Four generate calls: a batch, the same shape again, another shape, the first shape once more."""
    out = []
    for k, (batch, length) in enumerate([(3, 7), (3, 7), (1, 5), (3, 7)]):
        g = torch.Generator().manual_seed(k)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :2] = 0  # a left-padded row
        kwargs = dict(inputs_embeds=torch.randn(batch, length, 32, generator=g), attention_mask=mask,
                      max_new_tokens=NEW_TOKENS, min_new_tokens=3, num_beams=num_beams, do_sample=False,
                      length_penalty=length_penalty, pad_token_id=model.config.pad_token_id)
        if not model.config.is_encoder_decoder:
            kwargs["input_ids"] = torch.full((batch, length), 5)
        out.append(kwargs)
    return out


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("num_beams, length_penalty", [(1, 1.0), (5, 1.0), (5, -1.0)])
def test_fast_decoding_is_token_identical_to_generate(family, num_beams, length_penalty):
    model = tiny_llm(family)
    work = calls(model, num_beams, length_penalty)
    plain = [model.generate(**kwargs) for kwargs in work]
    with fast_decoding(model, 7 + NEW_TOKENS):
        fast = [model.generate(**kwargs) for kwargs in work]
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    assert "forward" not in vars(model) and "generate" not in vars(model)  # the model is as before


def test_the_captured_step_really_runs_from_its_buffers():
    """Undoing the warm-up's cache writes matters: skipped, the tokens change (so the test above can fail)."""
    from blip2_lite import fast_decode

    restore, same = fast_decode._set_positions, []
    fast_decode._set_positions = lambda cache, positions: None
    try:
        for family in ("opt", "t5"):
            model = tiny_llm(family)
            work = calls(model, 5, 1.0)
            plain = [model.generate(**kwargs) for kwargs in work]
            with fast_decoding(model, 7 + NEW_TOKENS):
                same += [torch.equal(a, model.generate(**kwargs)) for a, kwargs in zip(plain, work)]
    finally:
        fast_decode._set_positions = restore
    assert not all(same)


def test_beam_reordering_keeps_the_cache_tensors_in_place():
    cache = InPlaceStaticCache(tiny_llm("opt").config, 8)
    keys = torch.arange(3 * 2 * 1 * 16, dtype=torch.float).view(3, 2, 1, 16)
    cache.update(keys, keys + 1, 0)
    address = cache.layers[0].keys.data_ptr()
    before = cache.layers[0].keys.clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.layers[0].keys.data_ptr() == address
    assert torch.equal(cache.layers[0].keys, before[[2, 2, 0]])


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_blip2_captions_are_the_same_through_the_fast_path(family, tmp_path):
    tiny_conditional(tmp_path, family)
    model = load_hf_blip2(tmp_path, with_vision=False)
    model.tokenizer = word_tokenizer()
    features = torch.randn(3, 5, model.ln_vision.normalized_shape[0], generator=torch.Generator().manual_seed(1))
    prompts = ["w5 w6 w7", "", "w9"]
    plain = model.generate(image_features=features, prompts=prompts, max_new_tokens=6, num_beams=5)
    with fast_decoding(model.language_model, 32):
        fast = model.generate(image_features=features, prompts=prompts, max_new_tokens=6, num_beams=5)
        with pytest.raises(ValueError, match="set up for 32 positions"):
            model.generate(image_features=features, prompts=prompts, max_new_tokens=40)
        with pytest.raises(ValueError, match="greedy and beam search"):
            model.generate(image_features=features, prompts=prompts, max_new_tokens=6, do_sample=True)
    assert fast == plain
