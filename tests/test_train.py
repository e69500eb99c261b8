"""The training loop: resuming after an interruption is exact; a non-finite loss stops cleanly."""

import inspect
import re
from dataclasses import replace

import pytest
import torch

from blip2_lite.lite.stage1_recipe import stage1_losses, stage1_sampler
from blip2_lite.lite.world import CaptionedImages
from blip2_lite.train import (
    CHECKPOINT,
    NonFiniteLossError,
    TrainConfig,
    lr_lambda,
    train,
)

from tiny import DEC, WIDTH, tiny_model


def tiny_split(n=12, captions=3, length=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, DEC, (n, captions, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, 1, 5:] = 0
    return CaptionedImages(torch.randn(n, 7, WIDTH, generator=gen).half(), ids.masked_fill(mask == 0, 0), mask)


CONFIG = TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=3, checkpoint_every=5, eval_every=4, seed=3)


def run(tmp_path, name, stop_after=None, config=CONFIG):
    model = tiny_model()
    data = tiny_split()
    history = train(
        model, stage1_sampler(data, config.batch_size), stage1_losses, config, tmp_path / name,
        evaluate=lambda m: {"temp": m.temp.item()}, progress=False, stop_after=stop_after,
    )
    return model, history


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path):
    straight, history = run(tmp_path, "straight")
    run(tmp_path, "interrupted", stop_after=7)  # "killed" after step 7 (last checkpoint: step 7)
    resumed, resumed_history = run(tmp_path, "interrupted")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_history.losses == history.losses and resumed_history.metrics == history.metrics
    assert history.steps == list(range(1, 13)) and history.eval_steps == [4, 8, 12]


def test_rerun_of_a_finished_run_trains_nothing(tmp_path):
    first, _ = run(tmp_path, "done")
    again, history = run(tmp_path, "done")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert len(history.steps) == CONFIG.steps


def test_a_checkpoint_of_another_config_is_not_silently_reused(tmp_path):
    run(tmp_path, "run", stop_after=5)
    with pytest.raises(ValueError, match="another training config"):
        run(tmp_path, "run", config=TrainConfig(steps=20, batch_size=4))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, data = tiny_model(), tiny_split()
    sample = stage1_sampler(data, 4)
    calls = {"n": 0}

    def poisoned(rng):
        batch = sample(rng)
        calls["n"] += 1
        if calls["n"] == 8:
            batch["image_features"][0, 0, 0] = float("nan")
        return batch

    with pytest.raises(NonFiniteLossError, match=r"step 8.*checkpoint \(step 5\) is intact"):
        train(model, poisoned, stage1_losses, CONFIG, tmp_path / "nan", progress=False)
    state = torch.load(tmp_path / "nan" / CHECKPOINT, weights_only=True)
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(steps=100, batch_size=1, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    factor = lr_lambda(config)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(0.1)
    values = [factor(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_configs_and_data_are_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, batch_size=2, warmup_steps=6)
    with pytest.raises(ValueError, match="disagree"):
        CaptionedImages(torch.zeros(3, 7, WIDTH), torch.zeros(4, 2, 5, dtype=torch.long), torch.ones(4, 2, 5))
    with pytest.raises(ValueError, match="larger than"):
        stage1_sampler(tiny_split(n=3), batch_size=4)


def recording_losses(seen):
    """stage1_losses that records where the batch, the model and the loss generator live, and the autocast state."""
    def compute(model, batch, rng):
        seen.append({"batch": {v.device.type for v in batch.values()}, "model": next(model.parameters()).device.type,
                     "rng": rng.device.type, "autocast": torch.is_autocast_enabled(batch["input_ids"].device.type)})
        return stage1_losses(model, batch, rng)

    return compute


def test_the_loop_trains_on_the_device_it_is_given(tmp_path):
    seen = []
    model, data = tiny_model(), tiny_split()
    train(model, stage1_sampler(data, 4), recording_losses(seen), CONFIG, tmp_path / "cpu", progress=False,
          stop_after=2, device="cpu")
    assert seen == [{"batch": {"cpu"}, "model": "cpu", "rng": "cpu", "autocast": True}] * 2
    seen.clear()
    train(tiny_model(), stage1_sampler(data, 4), recording_losses(seen), replace(CONFIG, bf16=False),
          tmp_path / "fp32", progress=False, stop_after=1)
    assert seen[0]["autocast"] is False


def test_no_device_type_is_written_into_autocast():
    """Autocast takes its device type from the device it is given (blip2_lite.devices), never a literal."""
    import blip2_lite.devices
    import blip2_lite.evaluate.retrieval
    import blip2_lite.lite.llm
    import blip2_lite.train

    literal = re.compile(r"autocast\([^)]*[\"'](cpu|cuda)[\"']")
    for module in (blip2_lite.train, blip2_lite.devices, blip2_lite.evaluate.retrieval, blip2_lite.lite.llm):
        assert not literal.search(inspect.getsource(module)), module.__name__
    assert "with autocast(run.device" in inspect.getsource(blip2_lite.train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_uses_bf16_autocast_and_resumes_exactly(tmp_path):
    seen = []
    data = tiny_split()
    straight = tiny_model()
    train(straight, stage1_sampler(data, 4), recording_losses(seen), CONFIG, tmp_path / "a", progress=False, device="cuda")
    assert seen[0] == {"batch": {"cuda"}, "model": "cuda", "rng": "cuda", "autocast": True}
    train(tiny_model(), stage1_sampler(data, 4), stage1_losses, CONFIG, tmp_path / "b", progress=False,
          stop_after=7, device="cuda")
    resumed = tiny_model()
    train(resumed, stage1_sampler(data, 4), stage1_losses, CONFIG, tmp_path / "b", progress=False, device="cuda")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Two micro-batches of 4 per step give the step of one batch of 8 (a per-sample mean loss; float64)."""
    def draw(rng):
        x = torch.randn(4, 3, generator=rng, dtype=torch.float64)
        return {"x": x, "y": x.sum(dim=1, keepdim=True)}

    def both(rng):
        first, second = draw(rng), draw(rng)
        return {k: torch.cat([first[k], second[k]]) for k in first}

    def mse(model, batch, rng):
        return {"loss": ((model(batch["x"]) - batch["y"]) ** 2).mean()}

    results = []
    for sampler, accumulation in ((draw, 2), (both, 1)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1).double()
        config = TrainConfig(steps=5, batch_size=4, lr=1e-2, bf16=False, grad_accumulation=accumulation)
        history = train(model, sampler, mse, config, tmp_path / f"run{accumulation}", progress=False)
        results.append((model.weight.detach().clone(), history.losses["loss"]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12, rtol=0)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)  # logged in float32
