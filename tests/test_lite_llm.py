"""The lite LLMs: the shared tokenizer, the text-only corpora, seeded pretraining, and the cache."""

import json
import random

import pytest
import torch
from datasets import DatasetDict

from blip2_lite.evaluate.vqa import majority_answer
from blip2_lite.families import FAMILIES
from blip2_lite.lite import llm, llm_text, presets
from blip2_lite.lite.shapes_world import generate_shapes_world
from blip2_lite.prompts import PROMPTS
from blip2_lite.train import TrainConfig

TINY = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of a few sentences gain nothing from a second thread, and on a busy machine two
    threads per process oversubscribe the cores: these tests ran 2.4x slower so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world() -> DatasetDict:
    return generate_shapes_world({"train": 120, "val": 8, "test": 0}, progress=False)


@pytest.fixture(scope="module")
def tokenizer(world):
    return llm_text.train_tokenizer(world["train"])


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", [
    "a large red circle in the top left",
    "Question: how many shapes are there? Answer: 3</s>",
    "a picture of a magenta hexagon, Zürich, 東京 🙂",  # unseen words, accents, other scripts
    "  two  spaces,\ttabs\nand newlines  ",
    "",
])
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown


def test_special_ids_and_no_automatic_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer("red")["input_ids"] == [tokenizer.convert_tokens_to_ids("red")]
    assert tokenizer("red</s>")["input_ids"][-1] == tokenizer.eos_token_id  # written out, not added
    assert tokenizer(" red")["input_ids"] != tokenizer("red")["input_ids"]  # add_prefix_space False
    assert len(tokenizer) <= presets.LLM_VOCAB_SIZE


def test_prompt_word_after_a_caption_is_the_token_that_follows_a_soft_prompt(tokenizer):
    question = tokenizer("Question")["input_ids"]
    assert len(question) == 1
    assert tokenizer(" Question")["input_ids"] == tokenizer(" ")["input_ids"] + question


def test_tokenizer_training_is_deterministic(world, tokenizer):
    again = llm_text.train_tokenizer(world["train"])
    assert again.get_vocab() == tokenizer.get_vocab()
    text = " ".join(world["val"][0]["captions"])
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------- corpora


def test_opt_documents_have_the_agreed_format(world):
    split = world["train"]
    docs = llm_text.opt_documents(split, seed=0)
    n, rounds, context = len(split), llm_text.OPT_PARAPHRASE_ROUNDS, llm_text.OPT_PARAPHRASE_CONTEXT
    assert len(docs) == 5 * n + 6 * n + rounds * 5 * n
    assert docs[: 5 * n] == [f"{c}</s>" for captions in split["captions"] for c in captions]
    reading = iter(docs[5 * n : 11 * n])
    for captions, questions, answers in zip(split["captions"], split["questions"], split["answers"]):
        for question, ten in zip(questions, answers):
            doc = next(reading)
            suffix = f" {PROMPTS['vqa_opt'].format(question)} {majority_answer(ten)}</s>"
            assert doc.endswith(suffix)
            assert doc[: -len(suffix)] in captions  # the context: a caption of the same image
    paraphrase = iter(docs[11 * n :])
    for _ in range(rounds):
        for captions in split["captions"]:
            for caption in captions:  # every caption, in order, after `context` others of its image
                *others, last, empty = next(paraphrase).split("</s>")
                assert last == caption and empty == "" and len(others) == context
                assert len(set(others)) == context and set(others) <= set(captions) - {caption}
    assert llm_text.opt_documents(split, seed=0) == docs
    assert llm_text.opt_documents(split, seed=1) != docs  # other contexts


def test_a_reading_context_tells_the_answer(world):
    """Questions about places read the caption that places every object; the others any caption."""
    split = world["train"]
    contexts = list(llm_text.qa_with_context(split, random.Random(0)))
    facts = {c: json.loads(f) for cs, fs in zip(split["captions"], split["caption_facts"]) for c, f in zip(cs, fs)}
    about_places, others = [], []
    for context, question, _, qtype in contexts:
        (about_places if llm_text.asks_about_places(question, qtype) else others).append((context, question, qtype))
    assert {t for _, _, t in about_places} == {"color", "relation", "shape"}
    assert {t for _, _, t in others} == {"color", "count", "exists"}
    for context, question, _ in about_places:
        assert all("row" in obj and "col" in obj for obj in facts[context]["objects"]), question
    assert len({facts[c]["template"] for c, _, _ in others}) == 5  # drawn from every template
    for context, question, ten, qtype in contexts:
        if qtype == "color":  # the answer is in the context
            assert majority_answer(ten) in context.split(" "), (context, question)


def test_t5_pairs_have_the_agreed_format(world):
    split = world["train"]
    pairs = llm_text.t5_pairs(split, seed=0)
    captions = [c for per_image in split["captions"] for c in per_image]
    questions = 6 * len(split)
    assert len(pairs) == 2 * len(captions) + llm_text.T5_READING_REPEATS * questions
    for (source, prompt, target), caption in zip(pairs, captions):
        assert prompt == "" and target.endswith("</s>") and target[:-4]
        assert f"{source} {target[:-4]}".strip() == caption  # a split at a word boundary
    assert any(source == "" for source, _, _ in pairs[: len(captions)])  # k = 0 occurs
    per_image = len(split["captions"][0])
    for n, (source, prompt, target) in enumerate(pairs[len(captions) : 2 * len(captions)]):
        image_captions = split["captions"][n // per_image]
        assert prompt == "" and target == f"{image_captions[n % per_image]}</s>"  # every caption once, in order
        assert source in image_captions and source != image_captions[n % per_image]  # another one of its image
    reading = pairs[2 * len(captions) :]
    assert reading == reading[:questions] * llm_text.T5_READING_REPEATS
    qa = iter(reading)
    for per_image, questions_, answers in zip(split["captions"], split["questions"], split["answers"]):
        for question, ten in zip(questions_, answers):
            source, prompt, target = next(qa)
            assert source in per_image and prompt == PROMPTS["vqa_t5"].format(question)  # the question in the decoder
            assert target == f" {majority_answer(ten)}</s>"
    assert llm_text.t5_pairs(split, seed=0) == pairs


def test_t5_batch_feeds_the_decoder_its_prompt_and_scores_only_the_target():
    batch = llm_text.t5_batch([[5, 6], []], [[7, 8, 9], []], [[10, 1], [11, 12, 1]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6], [0, 0]] and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 8, 9, 10], [0, 11, 12, 0, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 10, 1], [11, 12, 1, -100, -100]]


def test_corpora_come_only_from_the_given_split(world):
    train_text = set(llm_text.tokenizer_texts(world["train"]))
    val_only = [c for per_image in world["val"]["captions"] for c in per_image if c not in train_text]
    assert val_only  # else the test proves nothing
    docs = "\n".join(llm_text.opt_documents(world["train"]))
    sources = "\n".join("".join(pair) for pair in llm_text.t5_pairs(world["train"]))
    assert not any(f"{c}</s>" in docs or f"{c} Question" in docs or c in sources for c in val_only)


def test_opt_rows_start_with_eos_at_a_random_position_and_predict_every_document_token(tokenizer):
    docs = [tokenizer(text)["input_ids"] for text in ("a red circle</s>", "two shapes: a blue star and a red cross</s>")]
    batch = llm_text.opt_batch(docs, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.eos_token_id] * 2
    for doc, labels, mask, positions in zip(docs, batch["labels"], batch["attention_mask"], batch["position_ids"]):
        assert labels[labels != -100].tolist() == doc and int(mask.sum()) == len(doc) + 1
        text_positions = positions[: len(doc) + 1]
        assert torch.equal(text_positions, text_positions[0] + torch.arange(len(doc) + 1))
        assert 0 <= text_positions[0] and text_positions[-1] < presets.OPT_SEQ_LEN
    assert batch["position_ids"][:, 0].tolist() != [0, 0]  # not always at the start


def test_encode_tokenises_each_distinct_text_once_with_the_ids_of_a_plain_call(world, tokenizer, monkeypatch):
    texts = [q for per_image in world["train"]["questions"] for q in per_image][:60] + ["", "a red circle"] * 3
    tokenizer(["x", "a longer text"], padding=True)  # a padded call first: its settings must not leak
    expected = tokenizer(texts)["input_ids"]
    calls, call = [], type(tokenizer).__call__

    def counting(self, batch, **kwargs):
        calls.append(len(batch))
        return call(self, batch, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    assert llm_text.encode(tokenizer, texts) == expected
    assert calls == [len(set(texts))] and llm_text.encode(tokenizer, []) == []


def test_packing_puts_every_document_in_one_bin_within_capacity():
    lengths = [70, 5, 64, 30, 30, 60, 1, 128]
    bins = llm_text.pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) == 4  # 388 tokens: no fewer than 4 rows of 128 can hold them


def test_packed_opt_batch_gives_the_padded_batch_loss_and_gradients(world, tokenizer):
    docs = llm_text.encode(tokenizer, llm_text.opt_documents(world["train"])[::97][:24])
    padded = llm_text.opt_batch(docs, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.Generator().manual_seed(3))
    packed = llm_text.opt_packed_batch(docs, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                       torch.Generator().manual_seed(3))
    assert packed["input_ids"].shape[0] < len(docs) and packed["input_ids"].shape[1] <= presets.OPT_SEQ_LEN
    assert packed["input_ids"].numel() < 0.8 * padded["input_ids"].numel()  # the padding is gone

    def targets(batch):  # (token, position) of every target
        kept = batch["labels"] != -100
        return sorted(zip(batch["labels"][kept].tolist(), batch["position_ids"][kept].tolist()))

    assert targets(packed) == targets(padded)
    model = llm.build_llm("opt", tokenizer, seed=0)
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert len(grad_a) == len(grad_b) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grad_a, grad_b))


# ----------------------------------------------------------------------------- pretraining


def small(world, images: int = 60) -> DatasetDict:
    return DatasetDict(train=world["train"].select(range(images)), val=world["val"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pretraining_loss_falls(world, tokenizer, family, monkeypatch):
    monkeypatch.setattr(llm, "HELDOUT_SCENES", 4)  # validation reads the first 4 val scenes' text
    config = TrainConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3, eval_every=15, checkpoint_every=30)
    model, history = llm.pretrain_llm(family, small(world), tokenizer, progress=False, config=config)
    losses = history["losses"]["loss"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    perplexities = history["metrics"]["val_perplexity"]
    assert history["eval_steps"] == [15, 30] and perplexities[-1] < perplexities[0] < len(tokenizer)
    heldout = world["val"].select(range(4))
    assert perplexities[-1] == pytest.approx(llm.perplexity(model, tokenizer, family, heldout), rel=1e-3)
    assert perplexities[-1] != pytest.approx(llm.perplexity(model, tokenizer, family, world["val"]), rel=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_seeded_pretraining_is_reproducible(world, tokenizer, family):
    first, history = llm.pretrain_llm(family, small(world), tokenizer, seed=5, progress=False, config=TINY)
    second, again = llm.pretrain_llm(family, small(world), tokenizer, seed=5, progress=False, config=TINY)
    other, _ = llm.pretrain_llm(family, small(world), tokenizer, seed=6, progress=False, config=TINY)
    assert same_weights(first, second) and history["losses"] == again["losses"]
    assert not same_weights(first, other)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_generation_matches_one_prompt_at_a_time(world, tokenizer, family):
    model = llm.build_llm(family, tokenizer, seed=0).eval()
    prompts, decoder_prompts, _, _ = llm.vqa_prompts(world["val"].select(range(1)), family)  # ragged: padding matters
    if decoder_prompts is not None:  # batches of 4 straddle decoder prompts of different lengths
        assert len({len(d.split()) for d in decoder_prompts}) > 1
    batched = llm.generate_text(model, tokenizer, family, prompts, max_new_tokens=4, batch_size=4,
                                decoder_prompts=decoder_prompts)
    assert batched == [llm.generate_text(model, tokenizer, family, [p], max_new_tokens=4,
                                         decoder_prompts=None if decoder_prompts is None else [d])[0]
                       for p, d in zip(prompts, decoder_prompts or prompts)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_attention_equals_the_fused_kernel(world, tokenizer, family):
    """The lite LLMs run transformers' plain attention for speed on CPUs: same logits as its default
    fused kernel (padded rows included)."""
    model = llm.build_llm(family, tokenizer, seed=0).eval()
    assert model.config._attn_implementation == presets.LLM_ATTENTION == "eager"
    batch = llm_text.collate(family, tokenizer, llm_text.tokenized_examples(family, tokenizer, world["val"], seed=0)[:6])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        plain = model(**inputs).logits
        model.set_attn_implementation("sdpa")
        fused = model(**inputs).logits
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=1e-5)


def test_text_vqa_accuracy_scores_every_question_type(world, tokenizer):
    model = llm.build_llm("t5", tokenizer, seed=0).eval()
    scores = llm.text_vqa_accuracy(model, tokenizer, "t5", world["val"], context=False)
    types = {t for per_image in world["val"]["question_types"] for t in per_image}
    assert set(scores) == {f"vqa_{t}" for t in types} | {"vqa_overall"}
    assert all(0 <= s <= 100 for s in scores.values())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_vqa_decodes_each_distinct_input_once(world, family, monkeypatch):
    decoded = []

    def fake_generate(model, tokenizer, family, prompts, max_new_tokens, decoder_prompts=None):
        # a stand-in LLM that answers an input the way annotators answered its first occurrence
        decoded.append(len(prompts))
        return [f" {truth[x]}" for x in zip(prompts, decoder_prompts or [None] * len(prompts))]

    monkeypatch.setattr(llm, "generate_text", fake_generate)
    for context in (False, True):
        prompts, decoder_prompts, answers, kinds = llm.vqa_prompts(world["val"], family, context)
        inputs = list(zip(prompts, decoder_prompts or [None] * len(prompts)))
        truth = {}
        for x, ten in zip(inputs, answers):
            truth.setdefault(x, majority_answer(ten))
        expected = llm.vqa_scores([truth[x] for x in inputs], answers, kinds)
        assert llm.text_vqa_accuracy(None, None, family, world["val"], context) == expected
        assert 0 < expected["vqa_overall"] < 100 or context  # repeated questions with other answers
        assert decoded.pop() == len(truth) and (context or len(truth) < len(inputs))


# ----------------------------------------------------------------------------- cache


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_lite_llm_trains_once_then_loads_the_same_frozen_model(world, family, tmp_path, monkeypatch):
    monkeypatch.setitem(presets.LLM_TRAIN, family, TINY)
    data = small(world, images=20)
    model, tokenizer = llm.load_lite_llm(family, data, root=tmp_path, progress=False)
    path = llm.llm_cache_dir(family, data, tmp_path)
    assert {"model.safetensors", "tokenizer.json", "history.json"} <= {p.name for p in path.iterdir()}
    assert [p.name for p in (tmp_path / "llm").iterdir()] == [path.name]  # no temporary folder left
    assert len(json.loads((path / "history.json").read_text())["losses"]["loss"]) == TINY.steps

    def no_training(*args, **kwargs):
        raise AssertionError("a cached LLM was trained again")

    monkeypatch.setattr(llm, "pretrain_llm", no_training)
    again, tokenizer_again = llm.load_lite_llm(family, data, root=tmp_path, progress=False)
    assert tokenizer_again.get_vocab() == tokenizer.get_vocab()
    batch = llm_text.collate(family, tokenizer, llm_text.tokenized_examples(family, tokenizer, data["val"], seed=0)[:4])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    for loaded in (model, again):
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert loaded.config._attn_implementation == presets.LLM_ATTENTION  # config.json does not keep it


def test_an_interrupted_save_leaves_no_cache(world, tmp_path, monkeypatch):
    monkeypatch.setitem(presets.LLM_TRAIN, "opt", TINY)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.load_lite_llm("opt", small(world, images=20), root=tmp_path, progress=False)
    assert list((tmp_path / "llm").iterdir()) == []


def test_plot_llm_history_draws_both_families(world, tokenizer):
    import matplotlib

    matplotlib.use("Agg")
    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, eval_every=1, checkpoint_every=2)
    histories = {f: llm.pretrain_llm(f, small(world, 10), tokenizer, progress=False, config=config)[1]
                 for f in sorted(FAMILIES)}
    loss_axes, perplexity_axes = llm.plot_llm_history(histories).axes
    assert [len(ax.lines) for ax in (loss_axes, perplexity_axes)] == [2, 2]
    assert list(perplexity_axes.lines[0].get_xdata()) == [1, 2]
