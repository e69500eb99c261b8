"""A full-size stage-1 training step: achieved TFLOP/s against the card's measured matmul rate, and
blip2_lite's step against the naive one, in one run.

Full size: BERT-base Q-Former (12 layers, 768 wide, cross-attention every 2nd layer), 32 queries, cached
ViT-g features (257 x 1408), 32 text tokens, ITC + ITM + ITG, bf16 autocast, fused AdamW; random
weights. The naive step recomputes the image keys/values for each of the 3B ITM pairs and runs a
joint causal pass for ITG (see stage1_step.py). FLOPs are counted by torch's FlopCounterMode on
one step (forward and backward, matrix products only), so the rate is model FLOPs / step time.
Needs CUDA for the full size; on a CPU it runs a small Q-Former, to keep the script working.

Run: .venv/bin/python benchmarks/stage1_step_full.py [--batches 64 128 256 512] [--compile]
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2_lite.qformer import QFormerConfig
from blip2_lite.stage1 import Blip2Stage1

from stage1_step import naive_losses


def matmul_rate(device: str, size: int) -> float:
    """bf16 FLOP/s of a square matrix product (the card's practical ceiling)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync(device)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    sync(device)
    return repeats * 2 * size**3 / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(model, optimizer, loss_fn, device: str):
    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def seconds_per_step(step, device: str, warmup: int = 3, steps: int = 10) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the Q-Former")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = device == "cuda"
    config = QFormerConfig(num_query_tokens=32) if full else QFormerConfig.small(encoder_width=64)
    tokens, text = (257, 32) if full else (17, 12)
    batches = args.batches if full else [8, 16]
    rate = matmul_rate(device, 8192 if full else 1024)
    print(f"device: {torch.cuda.get_device_name() if full else 'CPU (small Q-Former)'}, torch {torch.__version__}; "
          f"bf16 matmul {rate / 1e12:.1f} TFLOP/s")
    torch.manual_seed(0)
    model = Blip2Stage1(config, dec_token_id=1).to(device)
    fused = dict(fused=True) if full else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    for batch in batches:
        features = torch.randn(batch, tokens, config.encoder_width, device=device)
        ids = torch.randint(2, config.vocab_size, (batch, text), device=device)
        mask = torch.ones_like(ids)
        generator = torch.Generator(device=device).manual_seed(0)

        def ours():
            return model(ids, mask, image_features=features, generator=generator).loss

        def naive():
            return naive_losses(model, torch.nn.Identity(), features, ids, mask, generator)

        with FlopCounterMode(display=False) as counter:
            step_fn(model, optimizer, ours, device)()
        flops = counter.get_total_flops()
        times = {"blip2_lite": seconds_per_step(step_fn(model, optimizer, ours, device), device),
                 "naive": seconds_per_step(step_fn(model, optimizer, naive, device), device)}
        if args.compile:
            model.qformer = torch.compile(model.qformer)
            times["compiled Q-Former"] = seconds_per_step(step_fn(model, optimizer, ours, device), device)
            model.qformer = model.qformer._orig_mod
        achieved = flops / times["blip2_lite"]
        line = ", ".join(f"{name} {1000 * t:.1f} ms" for name, t in times.items())
        print(f"batch {batch}: {line}; naive / blip2_lite {times['naive'] / times['blip2_lite']:.2f}x; "
              f"{flops / 1e12:.2f} TFLOP per step -> {achieved / 1e12:.1f} TFLOP/s = {achieved / rate:.0%} of the "
              f"matmul rate")


if __name__ == "__main__":
    main()
