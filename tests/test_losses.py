"""Stage-1 losses: distributed ITC equals single-process ITC, negatives are never positives,
and optimisation lowers every loss."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip2_lite import Blip2Stage1, losses

from tiny import DEC, VOCAB, tiny_batch, tiny_config, tiny_model

WORLD = 2
PER_RANK = 3


def itc_on(model, features, ids, mask, image_ids=None):
    image_itc, _ = model.itc_image(model.image_embeds(image_features=features))
    return losses.itc_loss(image_itc, model.itc_text(ids, mask), model.temp, image_ids).loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _itc_rank(rank, port, out_dir, detach_others, use_image_ids):
    torch.set_num_threads(1)  # two ranks on two cores: more threads would only contend
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = tiny_model().eval()  # eval: no dropout, so both runs compute the same function
        features, ids, mask = tiny_batch(batch=WORLD * PER_RANK)
        image_ids = torch.tensor([0, 1, 0, 2, 3, 2]) if use_image_ids else None
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        if detach_others:  # what the reference code does: other ranks' features carry no gradient
            original = losses.gather_with_grad
            losses.gather_with_grad = lambda x: torch.cat(
                [x if r == rank else part for r, part in enumerate(losses.gather_no_grad(x).chunk(WORLD))]
            )
        loss = itc_on(model, features[local], ids[local], mask[local], None if image_ids is None else image_ids[local])
        if detach_others:
            losses.gather_with_grad = original
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():  # DDP: average gradients over ranks
            if p.grad is not None:
                dist.all_reduce(p.grad)
                grads[name] = p.grad / WORLD
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, detach_others=False, use_image_ids=False):
    mp.spawn(_itc_rank, args=(_free_port(), str(tmp_path), detach_others, use_image_ids), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    mean_loss = sum(r["loss"] for r in results) / WORLD
    return mean_loss, results[0]["grads"]


def single_process(use_image_ids=False):
    model = tiny_model().eval()
    features, ids, mask = tiny_batch(batch=WORLD * PER_RANK)
    image_ids = torch.tensor([0, 1, 0, 2, 3, 2]) if use_image_ids else None
    loss = itc_on(model, features, ids, mask, image_ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_image_ids", [False, True], ids=["pairs", "image-ids"])
def test_two_rank_itc_equals_single_process_in_loss_and_gradient(tmp_path, use_image_ids):
    loss_1, grads_1 = single_process(use_image_ids)
    loss_2, grads_2 = run_two_ranks(tmp_path, use_image_ids=use_image_ids)
    torch.testing.assert_close(loss_2, loss_1, atol=1e-6, rtol=0)
    assert grads_2.keys() == grads_1.keys()
    for name in grads_1:
        diff = (grads_2[name] - grads_1[name]).abs().max().item()
        assert torch.allclose(grads_2[name], grads_1[name], atol=1e-6, rtol=1e-5), f"{name}: max diff {diff:.2e}"


def test_detaching_other_ranks_gives_the_same_loss_but_wrong_gradients(tmp_path):
    loss_1, grads_1 = single_process()
    loss_2, grads_2 = run_two_ranks(tmp_path, detach_others=True)
    torch.testing.assert_close(loss_2, loss_1, atol=1e-6, rtol=0)
    name = "qformer.query_tokens"
    assert not torch.allclose(grads_2[name], grads_1[name], atol=1e-6, rtol=1e-5)


def test_itc_single_process_without_process_group_and_batch_size_1():
    assert not dist.is_initialized()
    model = tiny_model().eval()
    features, ids, mask = tiny_batch(batch=1)
    loss = itc_on(model, features, ids, mask)
    loss.backward()
    assert torch.isfinite(loss) and model.temp.grad is not None
    # one pair: the smoothed target is all on the only column, so the loss is exactly 0
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_itc_matches_a_direct_formula():
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    temp = torch.tensor(0.1)
    sim = torch.stack([torch.stack([(image[i] @ text[j]).max() for j in range(4)]) for i in range(4)]) / temp
    target = torch.full((4, 4), 0.1 / 4) + 0.9 * torch.eye(4)
    expected = (-(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(losses.itc_loss(image, text, temp).loss, expected)
    # the temperature is clamped into its range
    assert losses.itc_loss(image, text, torch.tensor(5.0)).loss == losses.itc_loss(image, text, torch.tensor(0.5)).loss


@pytest.mark.parametrize("image_ids", [None, torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])])
def test_itm_negatives_are_never_positives(image_ids):
    batch = 8
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(batch, batch, generator=gen) * 5
    sim.diagonal().add_(20)  # positives most similar: would be drawn if not masked
    ids = torch.arange(batch) if image_ids is None else image_ids
    positives = ids[:, None] == ids[None, :]
    for _ in range(200):
        neg_image, neg_text = losses.sample_hard_negatives(sim, sim.t(), positives, gen)
        assert not positives[torch.arange(batch), neg_image].any()
        assert not positives[torch.arange(batch), neg_text].any()


def test_itm_negatives_follow_the_softmax_of_similarities():
    sim = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    positives = torch.eye(3, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([losses.sample_hard_negatives(sim, sim, positives, gen)[1] for _ in range(4000)])
    freq_row0 = torch.bincount(draws[:, 0], minlength=3).float() / len(draws)
    expected = torch.tensor([0.0, 2.0, 0.0]).masked_fill(positives[0], float("-inf")).softmax(0)
    torch.testing.assert_close(freq_row0, expected, atol=0.03, rtol=0)


def test_itm_pairs_layout():
    text_index, image_index, labels = losses.itm_pairs(3, torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]))
    assert text_index.tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]
    assert image_index.tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_itg_inputs_and_loss():
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0]])
    mask = (ids != 0).long()
    decoder_ids, labels = losses.itg_inputs(ids, mask, dec_token_id=99)
    assert decoder_ids[:, 0].tolist() == [99, 99] and torch.equal(decoder_ids[:, 1:], ids[:, 1:])
    assert labels.tolist() == [[99, 5, 6, 102, -100], [99, 7, 102, -100, -100]]
    logits = torch.full((2, 5, 110), -30.0)
    logits[0, torch.arange(3), torch.tensor([5, 6, 102])] = 30.0  # perfect next-token predictions
    logits[1, torch.arange(2), torch.tensor([7, 102])] = 30.0
    assert losses.itg_loss(logits, labels, label_smoothing=0.0).item() < 1e-6
    assert losses.itg_loss(logits, labels).item() > 1.0  # label smoothing keeps a floor


def test_a_few_steps_lower_every_loss():
    """ITM first sits on a plateau at the entropy of its 1:2 label prior (0.6365) while the
    cross-attention learns to tell images apart; without dropout and at lr 5e-3 a fixed batch
    leaves it within ~100 steps."""
    model = tiny_model(hidden_dropout=0.0, attention_dropout=0.0)
    features, ids, mask = tiny_batch(batch=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(120):
        out = model(ids, mask, image_features=features, generator=gen)
        history.append([out.loss_itc.item(), out.loss_itm.item(), out.loss_itg.item()])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    first, last = torch.tensor(history[:3]).mean(0), torch.tensor(history[-3:]).mean(0)
    for name, a, b in zip(("itc", "itm", "itg"), first, last):
        assert b < 0.5 * a, f"{name} did not fall: {a:.3f} -> {b:.3f}"


def test_itg_over_a_vocabulary_subset_equals_the_full_head_restricted_to_it():
    torch.manual_seed(0)
    full = tiny_model()
    vocab = torch.tensor([41, 3, 7, 20, DEC])  # any order: kept sorted
    restricted = Blip2Stage1(full.config, dec_token_id=DEC, itg_vocab=vocab)
    restricted.load_state_dict(full.state_dict(), strict=False)  # the same weights; itg_vocab stays its own
    hidden = torch.randn(2, 4, full.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(restricted.itg_logits(hidden), full.itg_logits(hidden)[..., vocab.sort().values])
    labels = torch.tensor([[41, 3, -100, 5]])  # 5 is outside the subset: ignored, like padding
    assert restricted.itg_labels(labels).tolist() == [[3, 0, -100, -100]]
    assert full.itg_labels(labels) is labels
    # the subset is saved with the model, so a reloaded run predicts over the same words
    again = Blip2Stage1(full.config, dec_token_id=DEC, itg_vocab=vocab)
    again.load_state_dict(restricted.state_dict())
    assert torch.equal(again.itg_vocab, vocab.sort().values)
    for bad in ([], [3, 3], [-1], [VOCAB], [1.5], [True, False], [[3, 7]]):
        with pytest.raises(ValueError, match="itg_vocab"):
            Blip2Stage1(full.config, dec_token_id=DEC, itg_vocab=torch.tensor(bad))


@pytest.mark.parametrize("itm_pairs", [None, 3, 50])
def test_itm_on_a_sub_batch_scores_three_pairs_per_chosen_pair(itm_pairs):
    torch.manual_seed(0)
    model = Blip2Stage1(tiny_config(), dec_token_id=DEC, itm_pairs=itm_pairs)
    features, ids, mask = tiny_batch(batch=6)
    out = model(ids, mask, image_features=features, generator=torch.Generator().manual_seed(0))
    assert out.itm_logits.shape == (3 * min(6, itm_pairs or 6), 2)
    with pytest.raises(ValueError, match="itm_pairs"):
        Blip2Stage1(tiny_config(), dec_token_id=DEC, itm_pairs=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_equals_its_passes_run_one_by_one():
    """``forward`` computes the image keys/values once, with the vision LayerNorm folded into their
    projections, and shares them between the image and ITM passes: the losses and every gradient
    (the LayerNorm's included) equal the plain passes over ``ln_vision(features)``, in fp32."""
    torch.manual_seed(0)
    model = tiny_model(hidden_dropout=0.0, attention_dropout=0.0)
    with torch.no_grad():  # a LayerNorm far from its identity start, so that a wrong fold shows
        model.ln_vision.weight.normal_(1.0, 0.5)
        model.ln_vision.bias.normal_(0.0, 0.5)
    features, ids, mask = tiny_batch(batch=6)
    features = 3 * features + 1
    out = model(ids, mask, image_features=features, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    folded = _grads(model)
    model.zero_grad()

    image_embeds = model.image_embeds(image_features=features)
    image_itc, image_pass = model.itc_image(image_embeds)
    itc = losses.itc_loss(image_itc, model.itc_text(ids, mask), model.temp)
    negatives = losses.sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, itc.positives, torch.Generator().manual_seed(0))
    text_index, image_index, labels = losses.itm_pairs(6, *negatives)
    itm = losses.itm_loss(model.itm_logits(image_embeds, ids[text_index], mask[text_index], image_index), labels)
    decoder_ids, itg_labels = losses.itg_inputs(ids, mask, DEC)
    text_pass = model.qformer(decoder_ids, mask, mask="itg", query_past=image_pass.query_past)
    itg = losses.itg_loss(model.itg_logits(text_pass.text_output), model.itg_labels(itg_labels))
    for mine, theirs in ((out.loss_itc, itc.loss), (out.loss_itm, itm), (out.loss_itg, itg)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    (itc.loss + itm + itg).backward()
    plain = _grads(model)
    assert folded.keys() == plain.keys() and "ln_vision.weight" in plain
    for name in plain:
        torch.testing.assert_close(folded[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)
