"""Retrieval with ITM re-ranking (LAVIS's k_test protocol) against brute-force scoring of every pair."""

import pytest
import torch

from blip2_lite.evaluate.retrieval import itm_match_logits, itm_rerank, recalls, retrieval
from blip2_lite.losses import itc_similarity

from tiny import tiny_batch, tiny_model

NUM_IMAGES, CAPTIONS = 5, 2


@pytest.fixture(scope="module")
def setup():
    model = tiny_model().eval()
    features = tiny_batch(NUM_IMAGES, seed=0)[0]
    _, ids, mask = tiny_batch(NUM_IMAGES * CAPTIONS, seed=1)
    text_image = torch.arange(NUM_IMAGES).repeat_interleave(CAPTIONS)
    with torch.no_grad():  # brute force: ITM + ITC of every (image, text) pair, full precision
        embeds = model.image_embeds(image_features=features)
        itc = itc_similarity(model.itc_image(embeds)[0], model.itc_text(ids, mask))
        rows = torch.arange(NUM_IMAGES).repeat_interleave(len(ids))
        itm = model.itm_logits(embeds, ids.repeat(NUM_IMAGES, 1), mask.repeat(NUM_IMAGES, 1), rows)[:, 1]
    return model, features, ids, mask, text_image, itc, itc + itm.view(NUM_IMAGES, -1)


def test_rerank_of_every_candidate_is_brute_force(setup):
    model, features, ids, mask, text_image, itc, full = setup
    i2t, t2i = itm_rerank(model, features, ids, mask, itc, k_test=128, batch_size=7, bf16=False)
    torch.testing.assert_close(i2t, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(t2i, full, atol=1e-5, rtol=0)
    metrics = retrieval(model, features, ids, mask, text_image, rerank_k=128, bf16=False)
    brute = recalls(full, text_image)
    assert {k: metrics[f"itm_{k}"] for k in brute} == brute
    assert {"itm_i2t_r_mean", "itm_t2i_r_mean", "itm_r_mean", "r_mean"} <= metrics.keys()


def test_rerank_of_the_top_k_orders_them_as_brute_force(setup):
    model, features, ids, mask, text_image, itc, full = setup
    k = 3
    i2t, t2i = itm_rerank(model, features, ids, mask, itc, k_test=k, batch_size=4, bf16=False)
    for scores, itc_rows, full_rows in ((i2t, itc, full), (t2i.t(), itc.t(), full.t())):  # rows: the queries
        for row, itc_row, full_row in zip(scores, itc_rows, full_rows):
            top = itc_row.topk(k).indices
            assert set(row.isfinite().nonzero().flatten().tolist()) == set(top.tolist())  # the rest: -inf
            torch.testing.assert_close(row[top], full_row[top], atol=1e-5, rtol=0)
            assert torch.equal(row[top].argsort(descending=True), full_row[top].argsort(descending=True))


def test_itm_scores_each_pair_once_and_each_image_keys_values_once(setup, monkeypatch):
    model, features, ids, mask, _, itc, _ = setup
    rows, images = [], []
    itm_logits, keys_values = model.itm_logits, model.qformer.image_keys_values

    def counting_logits(image_embeds, input_ids, attention_mask, image_index, image_kv):
        rows.append(len(input_ids))
        return itm_logits(image_embeds, input_ids, attention_mask, image_index, image_kv)

    def counting_keys_values(image_embeds, norm=None):
        images.append(len(image_embeds))
        return keys_values(image_embeds, norm)

    monkeypatch.setattr(model, "itm_logits", counting_logits)
    monkeypatch.setattr(model.qformer, "image_keys_values", counting_keys_values)
    itm_rerank(model, features, ids, mask, itc, k_test=1, batch_size=4)
    assert sum(rows) <= NUM_IMAGES * 1 + len(ids) * 1 and max(rows) <= 4  # a shared pair scored once
    assert sum(images) <= NUM_IMAGES  # keys/values once per image, only for images with a pair


def test_itm_logits_in_any_pair_order_and_grouping(setup):
    model, features, ids, mask, _, _, full = setup
    pair_image = torch.tensor([4, 0, 2, 2, 1, 4, 3, 0, 1])
    pair_text = torch.tensor([0, 9, 3, 1, 2, 8, 5, 4, 7])  # ragged texts, in no order
    with torch.no_grad():
        embeds = model.image_embeds(image_features=features)
        itc = itc_similarity(model.itc_image(embeds)[0], model.itc_text(ids, mask))
    expected = (full - itc)[pair_image, pair_text]
    for images_per_group, batch_size in ((1, 1), (2, 3), (32, 64)):
        logits = itm_match_logits(model, embeds, ids, mask, pair_image, pair_text, batch_size,
                                  bf16=False, images_per_group=images_per_group)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert len(itm_match_logits(model, embeds, ids, mask, pair_image[:0], pair_text[:0])) == 0


def test_recall_beyond_k_is_not_reported_after_reranking(setup):
    model, features, ids, mask, text_image, _, _ = setup
    metrics = retrieval(model, features, ids, mask, text_image, rerank_k=3)
    assert {"itm_i2t_r1", "itm_t2i_r1", "i2t_r10", "r_mean"} <= metrics.keys()
    assert not {"itm_i2t_r5", "itm_t2i_r5", "itm_i2t_r10", "itm_r_mean"} & metrics.keys()
    # k = 5 covers every image: text->image ranks are complete, image->text ranks (10 texts) are not
    metrics = retrieval(model, features, ids, mask, text_image, rerank_k=5)
    assert {"itm_t2i_r10", "itm_i2t_r5"} <= metrics.keys() and "itm_i2t_r10" not in metrics
    with pytest.raises(ValueError, match="K > rerank_k"):
        retrieval(model, features, ids, mask, text_image, rerank_k=3, ks=(1, 5))


def test_bad_indices_and_shapes_raise(setup):
    model, features, ids, mask, text_image, itc, _ = setup
    wrong = text_image.clone()
    wrong[-1] = NUM_IMAGES  # no such image
    with pytest.raises(ValueError, match=r"text_image must be .* in \[0, 5\) .* values in \[0, 5\]"):
        retrieval(model, features, ids, mask, wrong)
    with pytest.raises(ValueError, match=r"text_image must be .* in \[0, 5\) .* values in \[-1, 3\]"):
        recalls(itc, text_image - 1)
    with pytest.raises(ValueError, match="text_image must give the image of each of the 10 texts"):
        retrieval(model, features, ids, mask, text_image[:-1])
    with pytest.raises(ValueError, match="text_image gives image 4 no caption"):
        recalls(itc, text_image.clamp(max=3))
    with pytest.raises(ValueError, match=r"relevant must be \[5 images, 10 texts\]"):
        retrieval(model, features, ids, mask, text_image, relevant=torch.ones(10, 5, dtype=torch.bool))
