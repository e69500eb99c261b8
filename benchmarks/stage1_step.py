"""Stage-1 training steps/s: blip2_lite's step against the same step built naively, in one run.

blip2_lite's step                          the naive step
- frozen features read from the cache      - the frozen encoder runs on the images every step
- ITM: image keys/values once per image,   - ITM: every one of the 3B pairs computes its image's
  indexed for the 3B pairs                   keys/values again
- ITG: text attends to the image pass's    - ITG: a joint causal pass recomputes the queries
  cached query keys/values                   (and their cross-attention)

Both compute the same losses (checked below in fp32). All steps run as in training, after
``train.keep_freed_memory()`` (glibc keeps freed memory instead of zeroing fresh pages every step).
Last, the same run starts a child process that times blip2_lite's step with glibc's default
allocator, the baseline for that setting.
Run: .venv/bin/python benchmarks/stage1_step.py
"""

import argparse
import subprocess
import sys
import time

import torch

from blip2_lite import losses
from blip2_lite.allocator import keep_freed_memory
from blip2_lite.convert.bert import qformer_from_bert
from blip2_lite.lite.shapes_world import make_scene
from blip2_lite.lite.world import lite_encoder
from blip2_lite.stage1 import Blip2Stage1


def naive_losses(model, encoder, pixels, input_ids, attention_mask, generator):
    image_embeds = model.ln_vision(encoder(pixels))
    image_itc, _ = model.itc_image(image_embeds)
    text_itc = model.itc_text(input_ids, attention_mask)
    itc = losses.itc_loss(image_itc, text_itc, model.temp)
    neg_image, neg_text = losses.sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, itc.positives, generator)
    text_index, image_index, labels = losses.itm_pairs(len(pixels), neg_image, neg_text)
    out = model.qformer(input_ids[text_index], attention_mask[text_index], image_embeds[image_index], mask="itm")
    loss_itm = losses.itm_loss(losses.itm_logits(model.itm_head, out.query_output), labels)
    decoder_ids, itg_labels = losses.itg_inputs(input_ids, attention_mask, model.dec_token_id)
    joint = model.qformer(decoder_ids, attention_mask, image_embeds, mask="itg")
    loss_itg = losses.itg_loss(model.itg_logits(joint.text_output), itg_labels)
    return itc.loss + loss_itm + loss_itg


def fast_losses(model, features, input_ids, attention_mask, generator):
    return model(input_ids, attention_mask, image_features=features, generator=generator).loss


def steps_per_second(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--default-allocator", action="store_true",
                        help="time only blip2_lite's step, with glibc's default allocator; print steps/s")
    args = parser.parse_args()
    kept = not args.default_allocator and keep_freed_memory()

    torch.manual_seed(0)
    encoder = lite_encoder()  # the lite world's tokens (final map + three earlier stages)
    qformer, tokenizer = qformer_from_bert(num_query_tokens=args.queries, encoder_width=encoder.feature_dim)
    model = Blip2Stage1(qformer.config, tokenizer.bos_token_id, qformer=qformer)
    scenes = [make_scene("train", i) for i in range(args.batch_size)]
    pixels = encoder.preprocess([s["image"] for s in scenes])
    tokens = tokenizer([s["captions"][0] for s in scenes], padding=True, return_tensors="pt")
    features = encoder(pixels)  # what the cache holds
    ids, mask = tokens.input_ids, tokens.attention_mask

    model.eval()  # no dropout: both steps must compute the same numbers
    with torch.no_grad():
        fast = fast_losses(model, features, ids, mask, torch.Generator().manual_seed(0))
        naive = naive_losses(model, encoder, pixels, ids, mask, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=1e-4)
    print(f"same loss in fp32: {fast.item():.5f} vs {naive.item():.5f}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def timed(loss_fn, *inputs):
        generator = torch.Generator().manual_seed(0)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, *inputs, ids, mask, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return steps_per_second(step, warmup=1, steps=args.steps)

    fast_rate = timed(fast_losses, features)
    if args.default_allocator:
        print(fast_rate)
        return
    naive_rate = timed(naive_losses, encoder, pixels)
    cached_naive_rate = timed(lambda m, f, *rest: naive_losses(m, torch.nn.Identity(), f, *rest), features)
    print(f"batch {args.batch_size}, {args.queries} queries, bf16 autocast, {torch.get_num_threads()} threads")
    print(f"blip2_lite step:                      {fast_rate:.3f} steps/s")
    print(f"naive step (encoder in the loop):      {naive_rate:.3f} steps/s")
    print(f"naive passes on cached features:       {cached_naive_rate:.3f} steps/s")
    print(f"speed-up over naive: {fast_rate / naive_rate:.2f}x "
          f"(of which shared K/V + ITG reuse: {fast_rate / cached_naive_rate:.2f}x)")
    if kept:
        child = subprocess.run([sys.executable, __file__, "--default-allocator", "--batch-size", str(args.batch_size),
                                "--queries", str(args.queries), "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True)
        default_rate = float(child.stdout.strip().splitlines()[-1])
        print(f"blip2_lite step, default allocator:   {default_rate:.3f} steps/s "
              f"(keeping freed memory: {fast_rate / default_rate:.2f}x)")
    else:
        print("no glibc here: all steps ran with the default allocator")


if __name__ == "__main__":
    main()
