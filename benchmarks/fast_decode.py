"""The fast decode path (``blip2_lite.fast_decode``) against transformers' ``generate`` on the same LLM, in one run.

Measured: milliseconds per new token (a fixed 20 new tokens after a 40-token soft prompt + prompt,
greedy at batch 1 and 8, beam 5 at batch 1), whether the tokens are identical, and on a GPU the
fraction of the weight-read floor (the LLM's bytes over the copy bandwidth measured in this run).
On a CPU a small random OPT and T5 (there is no graph to replay: expect no gain); with a GPU also
OPT-2.7B in fp16 and FlanT5-XL in bf16, random weights. Ratios are transformers' time / the fast path's.

Run: .venv/bin/python benchmarks/fast_decode.py [--repeats 5]
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, OPTConfig, T5Config

from blip2_lite.convert.pretrained import SALESFORCE_TEXT_CONFIGS
from blip2_lite.fast_decode import fast_decoding

NEW_TOKENS, PROMPT = 20, 40


def small_configs() -> dict:
    return {"OPT (4 layers, 256 wide)": OPTConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                                  num_attention_heads=4, ffn_dim=1024, word_embed_proj_dim=256,
                                                  max_position_embeddings=128),
            "T5 (4+4 layers, 256 wide)": T5Config(vocab_size=1000, d_model=256, d_kv=64, d_ff=1024, num_layers=4,
                                                  num_heads=4, decoder_start_token_id=0)}


def full_configs() -> dict:
    opt = OPTConfig(**SALESFORCE_TEXT_CONFIGS["Salesforce/blip2-opt-2.7b"])
    t5 = T5Config(**SALESFORCE_TEXT_CONFIGS["Salesforce/blip2-flan-t5-xl"])
    return {"OPT-2.7B fp16": (opt, torch.float16), "FlanT5-XL bf16": (t5, torch.bfloat16)}


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy of 2 GiB (read + write counted)."""
    x = torch.empty(2**30, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() * x.element_size() / (time.perf_counter() - start)


def ms_per_token(generate, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    out = generate()  # warm-up (and, for the fast path, the capture)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / NEW_TOKENS, out


def compare(name: str, config, dtype: torch.dtype, device: str, repeats: int, floor_ms: float | None) -> None:
    torch.manual_seed(0)
    kind = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(device):
        model = kind.from_config(config).to(dtype).eval()
    width = model.get_input_embeddings().embedding_dim
    for batch, beams in ((1, 1), (8, 1), (1, 5)):
        embeds = torch.randn(batch, PROMPT, width, device=device, dtype=dtype)
        options = dict(inputs_embeds=embeds, attention_mask=torch.ones(batch, PROMPT, dtype=torch.long, device=device),
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False,
                       pad_token_id=config.pad_token_id)
        with torch.no_grad():
            plain, plain_ids = ms_per_token(lambda: model.generate(**options), repeats, device)
            with fast_decoding(model, PROMPT + NEW_TOKENS + 1):
                fast, fast_ids = ms_per_token(lambda: model.generate(**options), repeats, device)
        floor = f", {floor_ms / fast:.0%} of the floor's speed ({floor_ms:.2f} ms)" if floor_ms else ""
        print(f"{name}, batch {batch}, beams {beams}: transformers {plain:.2f} ms/token, fast {fast:.2f} ms/token, "
              f"ratio {plain / fast:.2f}, tokens identical: {torch.equal(plain_ids, fast_ids)}{floor}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for name, config in small_configs().items():
        compare(name, config, torch.float32, device, args.repeats, None)
    if device == "cuda":
        bandwidth = copy_bandwidth(device)
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        for name, (config, dtype) in full_configs().items():
            with torch.device("meta"):
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) \
                    if not config.is_encoder_decoder else None
            floor = 1000 * size * 2 / bandwidth if size else None  # one read of the fp16 weights per token
            compare(name, config, dtype, device, args.repeats, floor)


if __name__ == "__main__":
    main()
