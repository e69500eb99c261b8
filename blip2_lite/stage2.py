"""BLIP-2 stage 2: generative learning, the Q-Former's query outputs as soft prompts for a frozen LLM.

The Q-Former runs its learned queries over the image (no text), a Linear projects the query
outputs to the LLM's width, and these *soft visual prompts* are placed in front of the LLM's own
input embeddings. The LLM stays frozen; only the Q-Former, the vision LayerNorm and the projection
learn. Two LLM families:

- decoder-only (OPT, any ``AutoModelForCausalLM``): ``[soft prompt; prompt text; target]``, language
  modelling loss on the target only (queries, prompt and padding are labelled -100);
- encoder-decoder (FlanT5, any ``AutoModelForSeq2SeqLM``): ``[soft prompt; prefix text]`` into the
  encoder, the suffix as the decoder's target (prefix language modelling).

Generation is transformers' ``generate`` on ``inputs_embeds``: greedy, beam search and sampling
come from there, not from a hand-written decoder.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .decoder_prompts import generate_by_prompt_length, pad_right
from .encoders.frozen import normalized_features, vision_embeds
from .encoders.images import as_image_list
from .families import LLMFamily, family_of
from .inputs import check_index, check_token_ids
from .llm_inputs import IGNORE_INDEX, insert_after_padding
from .qformer import QFormer

def _check_decoding(max_new_tokens, min_new_tokens, num_beams, num_return_sequences, do_sample, top_p, temperature):
    """Decoding settings transformers would reject deep inside ``generate`` (or divide by), named here."""
    if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, "
                         f"got {max_new_tokens} and {min_new_tokens}")
    if num_beams < 1 or num_return_sequences < 1:
        raise ValueError(f"num_beams and num_return_sequences must be >= 1, got {num_beams} and {num_return_sequences}")
    if not do_sample and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams}) "
                         "without sampling: raise num_beams or pass do_sample=True")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")


class Blip2(nn.Module):
    """Frozen image encoder -> vision LayerNorm -> Q-Former (queries only) -> projection -> frozen LLM.

    Args:
        qformer: the Q-Former (from stage 1, or queries-only as in the stage-2 checkpoints).
        language_model: a transformers causal or seq2seq LM; frozen here. It may be fp16/bf16 while
            the Q-Former and projection train in fp32: soft prompts are cast to its dtype.
        tokenizer: the LLM's tokenizer (needed by ``generate``).
        image_encoder: frozen module mapping pixels to ``[B, N, encoder_width]`` (optional: cached
            features can be passed instead), with a ``preprocess`` method for PIL images.
        image_token_id: the id transformers' BLIP-2 uses as placeholder for the soft prompt in
            ``input_ids``; only used to make repetition penalties see the same ids as transformers.
        prompt_in_decoder: for an encoder-decoder LLM pretrained to read its question at the start
            of its decoder (the lite world's T5): ``generate`` gives the encoder the soft prompt alone
            and starts the decoder from the prompt. False (FlanT5, as in BLIP-2): the prompt follows
            the soft prompt in the encoder.
    """

    def __init__(
        self,
        qformer: QFormer,
        language_model: nn.Module,
        tokenizer=None,
        image_encoder: nn.Module | None = None,
        vision_layer_norm_eps: float = 1e-6,
        image_token_id: int | None = None,
        prompt_in_decoder: bool = False,
    ):
        super().__init__()
        if prompt_in_decoder and not language_model.config.get_text_config().is_encoder_decoder:
            raise ValueError("prompt_in_decoder is for an encoder-decoder LLM; a decoder-only one reads "
                             "its prompt after the soft prompt")
        self.prompt_in_decoder = prompt_in_decoder
        self.image_encoder = image_encoder
        if image_encoder is not None:
            image_encoder.requires_grad_(False).eval()
        self.ln_vision = nn.LayerNorm(qformer.config.encoder_width, eps=vision_layer_norm_eps)
        self.qformer = qformer
        self.language_projection = nn.Linear(qformer.config.hidden_size, language_model.config.get_text_config().hidden_size)
        self.language_model = language_model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id

    @classmethod
    def from_stage1(cls, stage1: nn.Module, language_model: nn.Module, tokenizer=None,
                    prompt_in_decoder: bool = False) -> "Blip2":
        """Stage 2 starts from the stage-1 Q-Former (its query side: stage 2 feeds it no text, as in
        the Salesforce stage-2 checkpoints) and the stage-1 vision LayerNorm. Stage 1 is left intact."""
        qformer = QFormer(replace(stage1.qformer.config, text_input=False))
        text_side = ("word_embeddings.", "position_embeddings.", ".text_ffn.")
        qformer.load_state_dict({k: v.clone() for k, v in stage1.qformer.state_dict().items()
                                 if not any(part in k for part in text_side)})
        model = cls(qformer, language_model, tokenizer, stage1.image_encoder, stage1.ln_vision.eps,
                    prompt_in_decoder=prompt_in_decoder)
        model.ln_vision.load_state_dict(stage1.ln_vision.state_dict())
        return model

    @property
    def family(self) -> LLMFamily:
        return family_of(self.language_model)

    @property
    def encoder_decoder(self) -> bool:
        return self.family.encoder_decoder

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen parts stay in eval mode: no dropout, fixed statistics (the LLM is a fixed function)
        self.language_model.eval()
        if self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    # -- the soft visual prompt ------------------------------------------------------------------

    def image_embeds(self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None):
        """Frozen image features (computed without gradient, or given) through the vision LayerNorm, in fp32."""
        return vision_embeds(self.image_encoder, self.ln_vision, pixel_values, image_features)

    def soft_prompt(self, pixel_values=None, image_features=None, output_attentions: bool = False):
        """``[B, Q, llm_width]``: the projected query outputs, in the LLM's dtype. The vision LayerNorm's
        weight and bias are folded into the cross-attention's projections (``QFormer.image_keys_values``:
        the same keys and values, and training skips the gradient for the constant features)."""
        normalized = normalized_features(self.image_encoder, self.ln_vision, pixel_values, image_features)
        out = self.qformer(image_kv=self.qformer.image_keys_values(normalized, norm=self.ln_vision),
                           output_attentions=output_attentions)
        soft = self.language_projection(out.query_output).to(self.language_model.dtype)
        return (soft, out) if output_attentions else soft

    def llm_inputs(self, soft: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The LLM's ``inputs_embeds`` and ``attention_mask`` with the soft prompt placed in front of the text."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must be [batch, length], got shapes "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        words = self.language_model.get_input_embeddings()
        check_token_ids(input_ids, words.num_embeddings, "the language model's")
        if not self.encoder_decoder:
            self._check_window(input_ids.shape[1], 0)
        embeds = words(input_ids)
        return insert_after_padding(soft, embeds, attention_mask)

    # -- training ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ):
        """The LLM's output (``loss`` when ``labels`` are given, ``logits``) for images + text.

        Decoder-only: ``labels`` align with ``input_ids`` (-100 where no loss); the soft-prompt positions
        are labelled -100 here, and ``logits`` cover ``[soft prompt; text]``. Encoder-decoder: ``input_ids``
        is the encoder's prefix text, ``labels`` (or ``decoder_input_ids``) the decoder's side.
        """
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if self.encoder_decoder and labels is None and decoder_input_ids is None:
            raise ValueError("an encoder-decoder LLM needs labels or decoder_input_ids (its decoder's side); "
                             "use generate for text without a target")
        soft = self.soft_prompt(pixel_values, image_features)
        inputs_embeds, mask = self.llm_inputs(soft, input_ids, attention_mask)
        if self.encoder_decoder:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels,
                                       decoder_input_ids=decoder_input_ids,
                                       decoder_attention_mask=decoder_attention_mask)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must align with input_ids {tuple(input_ids.shape)}")
            no_loss = labels.new_full(soft.shape[:2], IGNORE_INDEX)
            labels = insert_after_padding(no_loss, labels, attention_mask)[0]
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels)

    # -- generation --------------------------------------------------------------------------------

    def context_window(self) -> int | None:
        config = self.language_model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def _check_window(self, prompt_length: int, max_new_tokens: int) -> None:
        """Soft prompt + prompt (+ new tokens, for a decoder) must fit the LLM's learned positions."""
        window, queries = self.context_window(), self.qformer.config.num_query_tokens
        if window is not None and queries + prompt_length + (0 if self.encoder_decoder else max_new_tokens) > window:
            raise ValueError(
                f"the soft prompt ({queries} tokens) + the longest prompt ({prompt_length} tokens)"
                + ("" if self.encoder_decoder or not max_new_tokens else f" + {max_new_tokens} new tokens")
                + f" exceed the language model's window of {window} tokens: shorten the prompt"
            )

    @torch.no_grad()
    def generate_ids(self, soft: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     **generate_kwargs) -> torch.Tensor:
        """New token ids from transformers' ``generate`` given soft prompts and (left-padded) prompt ids.

        Decoder-only LLMs also receive ``input_ids`` (soft-prompt positions as placeholder ids), so
        that processors such as the repetition penalty see the prompt, as in transformers' BLIP-2.
        """
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if self.prompt_in_decoder:  # the encoder reads the soft prompt alone; right-padded prompts
            check_token_ids(input_ids, self.language_model.get_input_embeddings().num_embeddings, "the language model's")
            lengths = attention_mask.long().sum(dim=1).tolist()  # long: an all-empty batch's mask is a float [B, 0]
            prompts = [ids[:n].tolist() for ids, n in zip(input_ids, lengths)]
            ones = soft.new_ones(soft.shape[:2], dtype=torch.long)
            new_ids = generate_by_prompt_length(
                self.language_model.generate, lambda rows: dict(inputs_embeds=soft[rows], attention_mask=ones[rows]),
                prompts, self.language_model.config.get_text_config().decoder_start_token_id, soft.device,
                **generate_kwargs)
            return pad_right(new_ids, generate_kwargs.get("pad_token_id", self.language_model.config.pad_token_id))
        inputs_embeds, mask = self.llm_inputs(soft, input_ids, attention_mask)
        if self.encoder_decoder:
            return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **generate_kwargs)
        placeholder = self.image_token_id if self.image_token_id is not None else self.language_model.config.pad_token_id
        ids_with_soft, _ = insert_after_padding(input_ids.new_full(soft.shape[:2], placeholder), input_ids,
                                                attention_mask)
        out = self.language_model.generate(input_ids=ids_with_soft, inputs_embeds=inputs_embeds, attention_mask=mask,
                                           **generate_kwargs)
        return out[:, ids_with_soft.shape[1]:]

    @torch.no_grad()
    def generate(
        self,
        images=None,
        prompts: str | list[str] | None = None,
        *,
        image_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        do_sample: bool = False,
        top_p: float = 1.0,
        temperature: float = 1.0,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        seed: int | None = None,
        image_index: torch.Tensor | None = None,
    ) -> list[str]:
        """Text for each image: captions with no prompt (or ``PROMPTS["caption"]``), answers with a VQA prompt.

        ``images``: PIL images, paths or bytes (decoded and converted to RGB), or give ``pixel_values``
        / cached ``image_features``. ``prompts``: one string for all images or one per image (batched
        with left padding). ``image_index``: when several prompts ask about one image (VQA), the image
        of each prompt; the Q-Former then reads each image once. Returns ``num_return_sequences``
        clean strings per prompt.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to Blip2(..., tokenizer=...)")
        given = [x is not None for x in (images, image_features, pixel_values)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of images, pixel_values or image_features")
        if images is not None:
            pixel_values = self.pixels(images)
        num_images = len(pixel_values if pixel_values is not None else image_features)
        if num_images == 0:
            raise ValueError("empty batch: no images given")
        if image_index is not None:
            image_index = check_index(image_index, num_images, "image_index", "images")
        batch = num_images if image_index is None else len(image_index)
        prompts = [prompts or ""] * batch if prompts is None or isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            given_for = "images" if image_index is None else "image_index entries"
            raise ValueError(f"{batch} {given_for} but {len(prompts)} prompts: give one prompt per image, or a single string")
        _check_decoding(max_new_tokens, min_new_tokens, num_beams, num_return_sequences, do_sample, top_p, temperature)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings (one for all images, or one per image)")

        input_ids, attention_mask = self.tokenize_prompts(prompts, special_tokens=not self.prompt_in_decoder)
        self._check_window(input_ids.shape[1], max_new_tokens)
        if seed is not None:
            torch.manual_seed(seed)
        soft = self.soft_prompt(pixel_values, image_features)
        if image_index is not None:
            soft = soft[image_index.to(soft.device)]
        options = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                       length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                       num_return_sequences=num_return_sequences, pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            options.update(do_sample=True, top_p=top_p, temperature=temperature)
        else:
            options.update(do_sample=False)
        new_ids = self.generate_ids(soft, input_ids.to(soft.device), attention_mask.to(soft.device), **options)
        return [text.strip() for text in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    def tokenize_prompts(self, prompts: list[str], special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (with the tokenizer's own special tokens, e.g. OPT's leading ``</s>``, unless
        ``special_tokens`` is False) padded on the left for decoder-only LLMs, so that generation
        continues from the same position in every row, and on the right for encoder-decoder ones.
        Empty prompts are allowed."""
        rows = self.tokenizer(prompts, add_special_tokens=special_tokens).input_ids
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids, mask = [], []
        right = self.family.padding_side == "right"
        for r in rows:
            fill = width - len(r)
            ids.append(r + [pad] * fill if right else [pad] * fill + r)
            mask.append([1] * len(r) + [0] * fill if right else [0] * fill + [1] * len(r))
        return torch.tensor(ids, dtype=torch.long).view(len(rows), width), torch.tensor(mask).view(len(rows), width)

    def pixels(self, images) -> torch.Tensor:
        """Images (paths, bytes, PIL images or arrays) -> the image encoder's pixel tensor (decoded, RGB)."""
        if self.image_encoder is None:
            raise ValueError("this model has no image_encoder: pass image_features instead of images")
        device = next(self.language_projection.parameters()).device
        return self.image_encoder.preprocess(as_image_list(images)).to(device)
