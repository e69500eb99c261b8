"""Faster decoding: transformers' own ``generate`` over a static KV cache, with every one-token step
replayed from one captured CUDA graph.

Why: decoding a 2.7B OPT at batch 1 is launch-bound. On an H200, transformers' ``generate`` took
12.2 ms per token where reading the weights once takes 1.23 ms: the GPU mostly waits for the
host to launch a few hundred small kernels per step. A CUDA graph launches them all at once.

What stays transformers': ``generate`` itself (greedy, beam search, length penalty, every logits
processor), so the tokens are those of plain ``generate`` (tests/test_fast_decode.py). What this
module adds, and why ``torch.compile(mode="reduce-overhead")`` over transformers' static cache is not
enough (it failed on that card: "accessing tensor output of CUDAGraphs that has been overwritten"):
- one cache per batch shape, reused across calls and reset in place, so its tensors keep the
  addresses the graph was captured with;
- beam search reorders the cache *in place* (transformers' layers rebind new tensors every step);
- the cache's write position is a tensor the step advances in place (transformers'
  ``StaticLayer.cumulative_length``): a replay advances it too, but warm-up runs before capture
  advance it as well, so their positions are put back;
- a decode step copies its inputs into fixed buffers and returns the graph's fixed output.
On a CPU there are no graphs: the same buffers and cache run eagerly (what the tests check there).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch
from transformers import EncoderDecoderCache, StaticCache


class InPlaceStaticCache(StaticCache):
    """transformers' StaticCache whose beam-search reordering keeps every tensor where it is."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                index = beam_idx.to(layer.keys.device)
                layer.keys.copy_(layer.keys.index_select(0, index))
                layer.values.copy_(layer.values.index_select(0, index))


def _layers(cache) -> list:
    if isinstance(cache, EncoderDecoderCache):
        return cache.self_attention_cache.layers + cache.cross_attention_cache.layers
    return list(cache.layers)


def _positions(cache) -> list[torch.Tensor]:
    return [layer.cumulative_length.clone() for layer in _layers(cache)]


def _set_positions(cache, positions: list[torch.Tensor]) -> None:
    for layer, position in zip(_layers(cache), positions):
        layer.cumulative_length.copy_(position)


def _buffers(value):
    """A copy of ``value`` whose tensors are new buffers (model outputs, e.g. T5's encoder outputs, included)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
        return type(value)(**{k: _buffers(v) for k, v in value.items()})
    return value


def _copy_into(buffers, value) -> None:
    if isinstance(buffers, torch.Tensor):
        buffers.copy_(value)
    elif isinstance(buffers, dict):
        for k, v in buffers.items():
            _copy_into(v, value[k])


def _shape_key(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device
    if isinstance(value, dict):
        return tuple((k, _shape_key(v)) for k, v in value.items())
    return id(value) if isinstance(value, (EncoderDecoderCache, StaticCache)) else repr(value)


class CapturedDecodeStep:
    """A language model's ``forward`` as ``generate`` calls it: the prompt pass runs as usual; a
    one-token decode step runs from fixed buffers, replaying one CUDA graph on GPUs."""

    def __init__(self, forward):
        self.forward = forward
        self.key = self.inputs = self.output = self.graph = None

    def __call__(self, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        step = kwargs.get("decoder_input_ids", kwargs.get("input_ids"))
        if cache is None or step is None or step.shape[1] != 1 or kwargs.get("inputs_embeds") is not None:
            return self.forward(**kwargs)  # the prompt pass
        if isinstance(cache, EncoderDecoderCache) and not all(cache.is_updated.values() or [False]):
            return self.forward(**kwargs)  # T5's first step fills the cross-attention cache, once per call
        key = {k: _shape_key(v) for k, v in kwargs.items()}
        if key != self.key:
            self._capture(kwargs, cache, key)
        else:
            _copy_into(self.inputs, kwargs)
        if self.graph is None:
            return self.forward(**self.inputs)
        self.graph.replay()
        return self.output

    def _capture(self, kwargs: dict, cache, key) -> None:
        self.key, self.graph = key, None
        self.inputs = {k: _buffers(v) for k, v in kwargs.items()}
        positions = _positions(cache)
        device = (kwargs.get("decoder_input_ids", kwargs.get("input_ids"))).device
        if device.type != "cuda":
            self.forward(**self.inputs)  # the warm-up a GPU needs, kept on CPUs so that tests check its undoing
            _set_positions(cache, positions)
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(**self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        _set_positions(cache, positions)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.forward(**self.inputs)
        _set_positions(cache, positions)


def _static_cache(language_model, max_length: int, encoder_length: int):
    config = language_model.config
    if config.is_encoder_decoder:
        return EncoderDecoderCache(InPlaceStaticCache(config, max_length), InPlaceStaticCache(config, encoder_length))
    return InPlaceStaticCache(config, max_length)


@contextmanager
def fast_decoding(language_model, max_length: int):
    """Within the block, ``language_model.generate`` (and so ``Blip2.generate``) decodes with a static
    cache of ``max_length`` positions (soft prompt + prompt + new tokens for decoder-only LLMs, new
    tokens + 1 for encoder-decoder ones) and a captured decode step; on leaving it, as before."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    step = CapturedDecodeStep(language_model.forward)
    plain_generate = language_model.generate
    # transformers renamed `past_key_values` to `cache` (5.2x); pass it under the name this version takes
    cache_argument = "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
    caches: dict[tuple, object] = {}

    @functools.wraps(plain_generate)
    def generate(*args, **kwargs):
        if kwargs.get("do_sample"):
            raise ValueError("fast decoding covers greedy and beam search; sample with plain generate")
        prompt = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
        new_tokens = kwargs.get("max_new_tokens", language_model.generation_config.max_new_tokens)
        # an encoder-decoder's cache holds its decoder's start (and any decoder prompt) + new tokens
        decoder_start = kwargs["decoder_input_ids"].shape[1] if "decoder_input_ids" in kwargs else 1
        needed = (new_tokens or 0) + (decoder_start if language_model.config.is_encoder_decoder else prompt.shape[1])
        if new_tokens is None or needed > max_length:
            raise ValueError(f"fast decoding was set up for {max_length} positions; this call needs {needed} "
                             f"({prompt.shape[1]} in the prompt, max_new_tokens={new_tokens}): raise max_length")
        rows = prompt.shape[0] * kwargs.get("num_beams", 1)
        key = (rows, prompt.shape[1])
        if key not in caches:  # a new shape: a new cache (and, at its first step, a new graph)
            caches.clear()
            caches[key] = _static_cache(language_model, max_length, prompt.shape[1])
        cache = caches[key]
        cache.reset()  # in place: zero states and positions (and T5's cross-attention flags)
        return plain_generate(*args, **{cache_argument: cache}, **kwargs)

    language_model.forward = functools.wraps(step.forward)(lambda **kwargs: step(**kwargs))
    language_model.generate = generate
    try:
        yield language_model
    finally:
        del language_model.forward, language_model.generate  # the class's own methods again
