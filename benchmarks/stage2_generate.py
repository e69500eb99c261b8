"""blip2_lite's BLIP-2 against transformers' Blip2ForConditionalGeneration on the same weights, in one run.

Measured: forward latency (pixels + prompt -> logits) and generation throughput (new tokens/s,
greedy and beam 5, a fixed 20 new tokens) at batch 1 and 8. On a CPU a small random model (OPT
language model); with a GPU also the full-size blip2-opt-2.7b architecture in fp16 (random weights).
Ratios are transformers' time / blip2_lite's time: above 1 means blip2_lite is faster.

Run: .venv/bin/python benchmarks/stage2_generate.py [--repeats 15]
"""

import argparse
import statistics
import time

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

from blip2_lite.convert.pretrained import blip2_from_hf_state, salesforce_config

NEW_TOKENS = 20


def small_config() -> Blip2Config:
    """A CPU-sized BLIP-2: 4-block ViT, 4-layer Q-Former, 4-layer OPT (same code paths as full size)."""
    vision = Blip2VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                               image_size=112, patch_size=14, initializer_range=0.02)
    qformer = Blip2QFormerConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                                 encoder_hidden_size=256)
    text = OPTConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                     word_embed_proj_dim=256, max_position_embeddings=128)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=32, image_token_index=999)


def timed_pair(first, second, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of ``first()`` and of ``second()`` after one warm-up call each. The two are
    timed alternately, so that a slow spell of the machine (another process, clock changes) falls
    on both rather than on whichever happened to run then."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def compare(config: Blip2Config, device: str, dtype: torch.dtype, repeats: int, label: str) -> list[float]:
    torch.manual_seed(0)
    with torch.device(device):
        reference = Blip2ForConditionalGeneration(config).eval()
    ours = blip2_from_hf_state(config, reference.state_dict()).to(device)
    if dtype != torch.float32:
        # as transformers does for BLIP-2 (_keep_in_fp32_modules): the Q-Former and queries stay fp32
        reference.vision_model.to(dtype), reference.language_model.to(dtype), reference.language_projection.to(dtype)
        ours.image_encoder.to(dtype), ours.language_model.to(dtype)
    q, size = config.num_query_tokens, config.vision_config.image_size
    ratios = []
    print(f"\n{label} ({device}, {dtype}): seconds (median of {repeats}); ratio = transformers / blip2_lite")
    print(f"{'measure':<28}{'transformers':>14}{'blip2_lite':>12}{'ratio':>8}")
    for batch in (1, 8):
        pixels = torch.randn(batch, 3, size, size, device=device)
        prompt = torch.randint(4, 900, (batch, 6), device=device)
        hf_ids = torch.cat([torch.full((batch, q), config.image_token_index, device=device), prompt], dim=1)
        with torch.no_grad():
            hf_forward = lambda: reference(pixel_values=pixels.to(dtype), input_ids=hf_ids)  # noqa: E731
            our_forward = lambda: ours(prompt, pixel_values=pixels)  # noqa: E731
            rows = [(f"forward, batch {batch}", *timed_pair(hf_forward, our_forward, repeats, device))]
            for beams in (1, 5):
                settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False)
                hf_gen = lambda: reference.generate(pixel_values=pixels.to(dtype), input_ids=hf_ids, **settings)  # noqa: E731
                our_gen = lambda: ours.generate_ids(ours.soft_prompt(pixel_values=pixels), prompt, **settings)  # noqa: E731
                name = "greedy" if beams == 1 else f"beam {beams}"
                rows.append((f"generate {name}, batch {batch}", *timed_pair(hf_gen, our_gen, repeats, device)))
        for name, hf_s, our_s in rows:
            ratios.append(hf_s / our_s)
            print(f"{name:<28}{hf_s:>14.4f}{our_s:>12.4f}{hf_s / our_s:>8.2f}")
    tokens = NEW_TOKENS * 8
    print(f"(generation throughput at batch 8: {tokens} new tokens per call)")
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    ratios = compare(small_config(), "cpu", torch.float32, args.repeats, "small BLIP-2 (OPT)")
    if torch.cuda.is_available():
        ratios += compare(salesforce_config("Salesforce/blip2-opt-2.7b"), "cuda", torch.float16, args.repeats,
                          "full-size blip2-opt-2.7b, random weights")
    else:
        print("\nno GPU: the full-size fp16 comparison was skipped")
    print(f"\ngeometric-mean ratio: {statistics.geometric_mean(ratios):.2f} (>= 1: blip2_lite is no slower)")


if __name__ == "__main__":
    main()
