"""Stage 2: blip2_lite's bridge to a frozen LLM equals transformers' Blip2ForConditionalGeneration
on the same weights (OPT and T5 language models), and generation behaves as users expect."""

import pytest
import torch

from blip2_lite.convert.engine import CheckpointError
from blip2_lite.convert.pretrained import load_hf_blip2
from blip2_lite.prompts import conversation_prompt
from blip2_lite.llm_inputs import IGNORE_INDEX, insert_after_padding, language_batch

from hf_tiny import EOS, IMAGE_TOKEN, LLM_VOCAB, PAD, tiny_conditional, word_tokenizer

TOL = 1e-5
FAMILIES = ["opt", "t5"]


def hf_vision_features(reference, pixels):
    """The vision tower's output before ``post_layernorm`` (blip2_lite's ``ln_vision`` applies it)."""
    with torch.no_grad():
        return reference.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]


def ragged_prompts(batch: int, length: int, left: bool, seed: int = 3):
    """Prompt ids with rows of different lengths, padded on the left (decoder-only) or right."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, IMAGE_TOKEN, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        pads = min(i, length - 1)
        if left:
            mask[i, :pads] = 0
        else:
            mask[i, length - pads :] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_input_ids(ids, mask, num_queries, left: bool):
    """transformers' layout: ``num_queries`` image tokens where blip2_lite puts the soft prompt."""
    image = torch.full((len(ids), num_queries), IMAGE_TOKEN)
    rows, masks = [], []
    for i in range(len(ids)):
        pads = int((mask[i] == 0).sum()) if left else 0
        rows.append(torch.cat([ids[i, :pads], image[i], ids[i, pads:]]))
        masks.append(torch.cat([mask[i, :pads], torch.ones(num_queries, dtype=torch.long), mask[i, pads:]]))
    return torch.stack(rows), torch.stack(masks)


@pytest.fixture(params=FAMILIES)
def pair(request, tmp_path):
    family = request.param
    reference = tiny_conditional(tmp_path, family)
    ours = load_hf_blip2(tmp_path, with_vision=False)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return family, reference, ours, pixels, hf_vision_features(reference, pixels)


def test_logits_match_transformers(pair):
    family, reference, ours, pixels, features = pair
    q = reference.config.num_query_tokens
    ids, mask = ragged_prompts(3, 6, left=family == "opt")
    hf_ids, hf_mask = hf_input_ids(ids, mask, q, left=family == "opt")
    extra = {}
    if family == "t5":
        extra["decoder_input_ids"] = torch.randint(2, IMAGE_TOKEN, (3, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **extra).logits
        got = ours(ids, mask, image_features=features, **extra).logits
    assert got.shape == expected.shape
    keep = hf_mask.bool() if family == "opt" else torch.ones(expected.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got[keep], expected[keep], atol=TOL, rtol=0)  # padded rows are never read


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_is_token_identical(pair, num_beams):
    family, reference, ours, pixels, features = pair
    q = reference.config.num_query_tokens
    left = family == "opt"
    ids, mask = ragged_prompts(3, 4, left=left)
    hf_ids, hf_mask = hf_input_ids(ids, mask, q, left=left)
    settings = dict(max_new_tokens=7, num_beams=num_beams, do_sample=False, pad_token_id=PAD)
    expected = reference.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **settings)
    if left:
        expected = expected[:, hf_ids.shape[1]:]  # decoder-only: transformers returns the prompt too
    with torch.no_grad():
        got = ours.generate_ids(ours.soft_prompt(image_features=features), ids, mask, **settings)
    assert torch.equal(got, expected), (got, expected)


def test_decoder_only_loss_covers_the_target_only(pair):
    family, _, ours, _, features = pair
    if family != "opt":
        pytest.skip("decoder-only")
    batch = language_batch(word_tokenizer(), ["w5 w6", "w7"], ["w8 w9 w10", "w11"], encoder_decoder=False)
    # labels: -100 on prompt and padding, the target plus end-of-sequence elsewhere
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10, EOS], [IGNORE_INDEX, 11, EOS] + [IGNORE_INDEX] * 3]
    out = ours(batch.input_ids, batch.attention_mask, labels=batch.labels, image_features=features[:2])
    q = ours.qformer.config.num_query_tokens
    logits = out.logits[:, q - 1 : -1]  # position t predicts token t + 1; the last soft position predicts text 0
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, LLM_VOCAB), batch.labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_prefix_lm_loss_is_the_decoders(pair):
    family, _, ours, _, features = pair
    if family != "t5":
        pytest.skip("encoder-decoder")
    batch = language_batch(word_tokenizer(), ["w5 w6", ""], ["w8 w9", "w11 w12 w13"], encoder_decoder=True)
    assert batch.input_ids.tolist() == [[5, 6], [PAD, PAD]] and batch.attention_mask.tolist() == [[1, 1], [0, 0]]
    assert batch.labels.tolist() == [[8, 9, EOS, IGNORE_INDEX], [11, 12, 13, EOS]]
    out = ours(batch.input_ids, batch.attention_mask, labels=batch.labels, image_features=features[:2])
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, LLM_VOCAB), batch.labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_only_the_bridge_learns_and_the_llm_may_be_bf16(pair):
    family, _, ours, _, features = pair
    ours.language_model.to(torch.bfloat16)
    ours.train()
    assert not ours.language_model.training  # frozen: no dropout
    batch = language_batch(word_tokenizer(), ["w5", "w6", "w7"], ["w8 w9", "w10", "w11 w12"], encoder_decoder=family == "t5")
    out = ours(batch.input_ids, batch.attention_mask, labels=batch.labels, image_features=features)
    out.loss.backward()
    assert all(p.grad is None for p in ours.language_model.parameters())
    assert ours.language_projection.weight.grad.dtype == torch.float32
    assert ours.qformer.query_tokens.grad is not None and ours.ln_vision.weight.grad is not None
    assert torch.isfinite(out.loss)


def test_insert_after_padding_keeps_left_padding_in_front():
    soft = torch.tensor([[[10.0], [11.0]]] * 2)
    embeds = torch.tensor([[[0.0], [5.0], [6.0]], [[1.0], [2.0], [3.0]]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rows, new_mask = insert_after_padding(soft, embeds, mask)
    assert rows[..., 0].tolist() == [[0, 10, 11, 5, 6], [10, 11, 1, 2, 3]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


# -- generate(): strings, batching, bad input -----------------------------------------------------------


@pytest.fixture(params=FAMILIES)
def captioner(request, tmp_path):
    reference = tiny_conditional(tmp_path, request.param)
    model = load_hf_blip2(tmp_path, with_vision=False)
    model.tokenizer = word_tokenizer()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    return model, hf_vision_features(reference, pixels)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_prompts_give_the_same_text_as_one_by_one(captioner, num_beams):
    model, features = captioner
    prompts = ["w5 w6 w7", "", "w9", "w10 w11"]  # different lengths: left padding must not change results
    batched = model.generate(image_features=features, prompts=prompts, max_new_tokens=6, num_beams=num_beams)
    alone = [model.generate(image_features=features[i : i + 1], prompts=p, max_new_tokens=6, num_beams=num_beams)[0]
             for i, p in enumerate(prompts)]
    assert batched == alone
    assert all(isinstance(t, str) and t == t.strip() and "<pad>" not in t for t in batched)


def test_prompts_sharing_an_image_read_it_once(captioner, monkeypatch):
    model, features = captioner
    prompts, image_of = ["w5 w6", "w9", "", "w10 w11", "w7"], torch.tensor([0, 0, 2, 3, 3])
    read, soft_prompt = [], model.soft_prompt
    monkeypatch.setattr(model, "soft_prompt", lambda pixels, feats: read.append(len(feats)) or soft_prompt(pixels, feats))
    shared = model.generate(image_features=features, prompts=prompts, image_index=image_of, max_new_tokens=6)
    assert shared == model.generate(image_features=features[image_of], prompts=prompts, max_new_tokens=6)
    assert read == [4, 5]  # the Q-Former read 4 images for 5 prompts, then the 5 repeated rows


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_prompt_in_the_decoder_is_read_after_the_soft_prompt_alone(tmp_path, num_beams):
    """``prompt_in_decoder`` (the lite T5): the encoder reads only the soft prompt and the decoder starts
    from [start; prompt]; equal to transformers' generate called that way row by row, whatever the
    other rows' prompt lengths."""
    reference = tiny_conditional(tmp_path, "t5")
    model = load_hf_blip2(tmp_path, with_vision=False)
    model.tokenizer, model.prompt_in_decoder = word_tokenizer(), True
    features = hf_vision_features(reference, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    prompts = ["w5 w6 w7", "", "w9"]
    batched = model.generate(image_features=features, prompts=prompts, max_new_tokens=5, num_beams=num_beams)
    llm, soft = model.language_model, model.soft_prompt(image_features=features)
    for i, prompt in enumerate(prompts):
        start = [llm.config.decoder_start_token_id] + [int(w[1:]) for w in prompt.split()]
        out = llm.generate(inputs_embeds=soft[i : i + 1], attention_mask=torch.ones(1, soft.shape[1], dtype=torch.long),
                           decoder_input_ids=torch.tensor([start]), max_new_tokens=5, num_beams=num_beams,
                           do_sample=False, pad_token_id=PAD)
        assert batched[i] == model.tokenizer.decode(out[0, len(start):], skip_special_tokens=True).strip()
    assert batched != model.generate(image_features=features, prompts=prompts[:1] * 3, max_new_tokens=5)  # prompts matter
    captions = model.generate(image_features=features, max_new_tokens=5, num_beams=num_beams)  # no prompt at all
    assert captions[1] == batched[1]
    with pytest.raises(ValueError, match="prompt_in_decoder is for an encoder-decoder"):
        type(model)(model.qformer, tiny_conditional(tmp_path / "opt", "opt").language_model, prompt_in_decoder=True)


def test_generation_settings_reach_generate(captioner):
    model, features = captioner
    greedy = model.generate(image_features=features, prompts="w5", max_new_tokens=8, min_new_tokens=8)
    assert all(len(t.split()) == 8 for t in greedy)  # min_new_tokens forbids the end-of-sequence token
    sampled = [model.generate(image_features=features, prompts="w5", max_new_tokens=8, do_sample=True, top_p=0.9,
                              temperature=1.5, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded sampling: reproducible, not constant
    several = model.generate(image_features=features[:2], max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert len(several) == 4
    penalised = model.generate(image_features=features, prompts="w5", max_new_tokens=8, repetition_penalty=100.0)
    assert all(len(set(t.split())) == len(t.split()) for t in penalised)  # no token twice


def test_bad_input_gives_clear_errors(captioner):
    model, features = captioner
    with pytest.raises(ValueError, match="2 prompts"):
        model.generate(image_features=features, prompts=["w5", "w6"])
    with pytest.raises(ValueError, match=r"image_index must be .* in \[0, 4\)"):
        model.generate(image_features=features, prompts=["w5"], image_index=torch.tensor([4]))
    with pytest.raises(ValueError, match="2 image_index entries but 1 prompts"):
        model.generate(image_features=features, prompts=["w5"], image_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(image_features=features[:0])
    with pytest.raises(ValueError, match="exactly one"):
        model.generate(prompts="w5")
    with pytest.raises(ValueError, match="no image_encoder"):
        model.generate(images=[b"not an image"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(image_features=features, max_new_tokens=0)
    if not model.encoder_decoder:
        with pytest.raises(ValueError, match="window of 64 tokens"):
            model.generate(image_features=features, prompts=" ".join(["w5"] * 58), max_new_tokens=5)


def test_conversation_prompt():
    prompt = conversation_prompt([("what is it?", "a circle")], "what color is it?")
    assert prompt == "Question: what is it? Answer: a circle Question: what color is it? Answer:"


def test_strict_loading_names_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_conditional(tmp_path, "opt")
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["language_model.extra.weight"] = torch.zeros(1)
    del state["language_projection.bias"]
    save_file(state, weights)
    with pytest.raises(CheckpointError) as error:
        load_hf_blip2(tmp_path, with_vision=False)
    assert "language_projection.bias" in str(error.value) and "language_model.extra.weight" in str(error.value)
