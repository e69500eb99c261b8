"""Tiny random BLIP-2 checkpoints built with transformers' own classes (the reference)."""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
)

VOCAB = 50
ENCODER_WIDTH = 24


def qformer_config(num_layers: int, cross_attention_freq: int, text_input: bool) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=48,
        encoder_hidden_size=ENCODER_WIDTH,
        cross_attention_frequency=cross_attention_freq,
        use_qformer_text_input=text_input,
        vocab_size=VOCAB,
        max_position_embeddings=20,
    )


def randomise_layernorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh models have LayerNorm weight 1 / bias 0, which would hide a mis-mapped LayerNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def vision_config() -> Blip2VisionConfig:
    """A 2-layer ViT over 32 px images (16 patches of 8 px)."""
    return Blip2VisionConfig(
        hidden_size=ENCODER_WIDTH, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, initializer_range=0.02,
    )


def tiny_qformer(path, num_layers: int, cross_attention_freq: int) -> Blip2QFormerModel:
    torch.manual_seed(0)
    model = Blip2QFormerModel(qformer_config(num_layers, cross_attention_freq, text_input=False)).eval()
    randomise_layernorms(model)
    model.save_pretrained(path)
    return model


def tiny_retrieval(path, num_layers: int, cross_attention_freq: int, num_query_tokens: int) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(0)
    vision = vision_config()
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer_config(num_layers, cross_attention_freq, text_input=True).to_dict(),
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)  # zeros by default: would make every query identical
    randomise_layernorms(model)
    model.save_pretrained(path)
    return model


def padded_text(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids with ragged lengths (row i keeps length - i tokens, at least 2)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, max(2, length - i) :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# -- stage 2: tiny Blip2ForConditionalGeneration with an OPT or a T5 language model ------------------

LLM_VOCAB = 40
IMAGE_TOKEN = LLM_VOCAB - 1  # transformers' placeholder for the soft prompt in input_ids
PAD, EOS = 0, 1


def text_config(family: str):
    from transformers import OPTConfig, T5Config

    if family == "opt":
        return OPTConfig(vocab_size=LLM_VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                         max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=PAD, bos_token_id=EOS,
                         init_std=0.2,  # larger than the default 0.02, so that a mis-mapped weight shows in the logits
                         eos_token_id=EOS)
    return T5Config(vocab_size=LLM_VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS,
                    decoder_start_token_id=PAD)


def tiny_conditional(path, family: str, num_query_tokens: int = 4):
    """A random ``Blip2ForConditionalGeneration`` saved with ``save_pretrained`` (the Salesforce layout)."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    vision = vision_config()
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer_config(3, 2, text_input=False).to_dict(),
        text_config=text_config(family).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=IMAGE_TOKEN,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)
        for name, p in model.vision_model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):  # EVA's q and v biases; the key third stays zero
                q, _, v = p.chunk(3)
                q.normal_(std=0.1), v.normal_(std=0.1)
    randomise_layernorms(model)
    model.save_pretrained(path)
    return model


def word_tokenizer():
    """A word-level tokenizer over the tiny LLM's vocabulary: "w2 w3" <-> [2, 3] (no special tokens added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS} | {f"w{i}": i for i in range(2, LLM_VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")
