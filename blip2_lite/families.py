"""The two kinds of frozen LLM that BLIP-2 bridges to, and everything that differs between them.

Decoder-only (OPT): the soft prompt, the text prompt and the target form one sequence; prompts are
padded on the left for generation. Encoder-decoder (FlanT5): the soft prompt and the prompt go into
the encoder, the target is the decoder's (prefix language modelling). Code asks this table instead
of comparing family names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import PROMPTS


@dataclass(frozen=True)
class LLMFamily:
    name: str
    encoder_decoder: bool
    vqa_prompt: str  # the paper's zero-shot VQA template (section 4.2)
    image_token_index: int  # the placeholder transformers' BLIP-2 processor puts where the queries go

    @property
    def padding_side(self) -> str:
        """Where prompts are padded: a decoder continues each row from its last token, so on the left."""
        return "right" if self.encoder_decoder else "left"

    def model_class(self):
        """transformers' class for a model of this family (the lite world builds its own)."""
        from transformers import OPTForCausalLM, T5ForConditionalGeneration

        return T5ForConditionalGeneration if self.encoder_decoder else OPTForCausalLM


FAMILIES = {
    "opt": LLMFamily("opt", encoder_decoder=False, vqa_prompt=PROMPTS["vqa_opt"], image_token_index=50265),
    "t5": LLMFamily("t5", encoder_decoder=True, vqa_prompt=PROMPTS["vqa_t5"], image_token_index=32100),
}


def llm_family(name: str) -> LLMFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown LLM family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(language_model) -> LLMFamily:
    """The family of a transformers LLM, by its architecture (encoder-decoder or not)."""
    return FAMILIES["t5" if language_model.config.get_text_config().is_encoder_decoder else "opt"]
