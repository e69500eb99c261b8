"""The lite LLMs' text: one tokenizer, the pretraining corpora, and their batches.

BLIP-2's LLM knows the language but has never seen an image. No pretrained OPT or T5 can be
downloaded offline, so the lite world pretrains tiny ones on the *text* of the training split
(``lite.llm``) and then freezes them. What they read decides whether stage 2 can work: a frozen
LLM follows a soft prompt only through a route it already uses to read context.

* One byte-level BPE tokenizer for both families (ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the T5
  convention, where pad is also the decoder start). It adds no special tokens by itself: code
  appends ``</s>`` to targets explicitly. Its training text holds the prompt words without a
  leading space, so " Question" is tokenised as "Ġ" + "Question": the "Question" that follows a
  soft prompt in stage 2 is then the very token the LLM learned after a caption.
* OPT (decoder-only) reads documents: each caption alone, reading-comprehension documents
  "{caption} Question: {q} Answer: {a}</s>" whose caption tells the answer (``qa_with_context``),
  so it learns to answer from the preceding context, and
  paraphrase documents "{caption}</s>{caption}</s>{caption}</s>", three captions of one scene, so
  that it learns to write a caption from what came before it (the route stage 2 needs: there the
  image's soft prompt takes the place of the context). Each document is read on its own, after
  an eos (as OPT's own tokenizer does; so "</s>" alone prompts a caption), starting at a random
  position so that all of OPT's learned position embeddings are trained: in stage 2 the text
  starts after the soft prompt, not at position 0. (Packed GPT-style, several documents per row
  seeing each other, this small model did not learn to use the context at all: it must first
  learn to ignore the unrelated documents before the current one. ``opt_packed_batch`` packs
  rows with a mask that keeps each document to itself.)
* T5 (encoder-decoder) reads prefix-LM pairs (the first k words of a caption -> the rest),
  paraphrase pairs (one caption of a scene -> another caption of the same scene) and reading
  pairs: a caption in the encoder, and in the decoder "Question: {q} Short answer:" as a given
  prefix (no loss on it) followed by " {a}</s>". The paraphrase pairs are the only text whose
  *content* (colours, shapes, counts) the decoder must read from the encoder rather than guess;
  without them T5 gave one caption for every image in stage 2. The question sits in the decoder so
  that T5 answers by reading the context through its cross-attention, the route by which stage 2
  teaches it the soft prompt: with the question in the encoder beside the caption, T5 answered by
  letting the question's tokens read the caption inside the encoder, a route stage 2 never trains,
  and its zero-shot answers stayed at the majority answer (README, stage 2).
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerFast

from ..evaluate.vqa import majority_answer
from ..families import FAMILIES, llm_family
from ..prompts import PROMPTS
from .captions import CAPTION_TEMPLATES
from .presets import LLM_VOCAB_SIZE, OPT_SEQ_LEN

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2: the order in which the tokenizer learns them
# OPT's paraphrase documents: rounds over the captions, and how many captions of the scene precede
# each. Without them OPT's stage-2 captions ignored the image (README, stage 2).
OPT_PARAPHRASE_ROUNDS, OPT_PARAPHRASE_CONTEXT = 2, 2
POSITIONS = list(CAPTION_TEMPLATES).index("positions")  # a scene's captions come in the templates' order
# T5's reading pairs come this many times over: read from the decoder, answering takes T5 longer to learn
T5_READING_REPEATS = 3
CORPUS_VERSION = 8  # bump when the documents, pairs, tokenizer, batches or training change: cached models are keyed by it


# ----------------------------------------------------------------------------- tokenizer


def _prompt_words() -> list[str]:
    """The fixed text around each prompt's slot, e.g. "Question:" and "Answer:"."""
    return [part.strip() for template in PROMPTS.values() for part in template.split("{}") if part.strip()]


def tokenizer_texts(split) -> list[str]:
    """Every caption, question and (annotator) answer of the split, and the prompt words."""
    captions = [c for per_image in split["captions"] for c in per_image]
    questions = [q for per_image in split["questions"] for q in per_image]
    answers = [a for per_image in split["answers"] for ten in per_image for a in ten]
    return captions + questions + answers + _prompt_words()


def train_tokenizer(split) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary of at most ``LLM_VOCAB_SIZE``) trained on the split's text.

    All 256 bytes are in the vocabulary, so any text (unseen words, other scripts) round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LLM_VOCAB_SIZE, special_tokens=[PAD, EOS, UNK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(tokenizer_texts(split), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, model_max_length=OPT_SEQ_LEN)


# ----------------------------------------------------------------------------- corpora


def asks_about_places(question: str, qtype: str) -> bool:
    """Whether a question names a grid cell ("what shape is in the top left?", "what color is the
    shape in the center?") or a relation ("what shape is above the red circle?")."""
    return qtype == "relation" or " in the " in question


def qa_with_context(split, rng: random.Random):
    """(context, question, ten answers, question type) per question of the split; the context is a
    caption of the same image that tells the answer: the one that places every object when the
    question is about places (``asks_about_places``), else one chosen at random (every caption
    names every object by colour and shape). With any caption as context, a fifth of the reading
    documents could not be answered from it, and OPT learned to guess colours (README, stage 2)."""
    for captions, questions, answers, types in zip(split["captions"], split["questions"], split["answers"],
                                                   split["question_types"]):
        for question, ten, qtype in zip(questions, answers, types):
            chosen = POSITIONS if asks_about_places(question, qtype) else rng.randrange(len(captions))
            yield captions[chosen], question, ten, qtype


def opt_documents(split, seed: int = 0) -> list[str]:
    """Each caption as "{caption}</s>", then per question "{context} Question: {q} Answer: {a}</s>",
    then ``OPT_PARAPHRASE_ROUNDS`` times per caption ``OPT_PARAPHRASE_CONTEXT`` other captions of its
    image and it, each ending in "</s>"."""
    rng = random.Random(seed)
    captions = [f"{c}{EOS}" for per_image in split["captions"] for c in per_image]
    reading = [f"{context} {FAMILIES['opt'].vqa_prompt.format(q)} {majority_answer(ten)}{EOS}"
               for context, q, ten, _ in qa_with_context(split, rng)]
    paraphrase = ["".join(f"{c}{EOS}" for c in (*context, caption))
                  for _ in range(OPT_PARAPHRASE_ROUNDS)
                  for context, caption in paraphrases(split, rng, OPT_PARAPHRASE_CONTEXT)]
    return captions + reading + paraphrase


def paraphrases(split, rng: random.Random, context: int = 1):
    """(``context`` other captions of the same image, caption) for every caption of the split."""
    for captions in split["captions"]:
        for j, caption in enumerate(captions):
            others = rng.sample([i for i in range(len(captions)) if i != j], context)
            yield [captions[i] for i in others], caption


def t5_pairs(split, seed: int = 0) -> list[tuple[str, str, str]]:
    """(encoder text, decoder prompt, decoder target) triples: prefix-LM splits of each caption (first
    k words -> the rest, k uniform in [0, n_words - 1], so k = 0 gives an empty source), then per
    caption another caption of its image -> it (both without a decoder prompt), then
    ``T5_READING_REPEATS`` times over per question: its context -> "Question: {q} Short answer:",
    " {a}</s>"."""
    rng = random.Random(seed)
    pairs = []
    for caption in (c for per_image in split["captions"] for c in per_image):
        words = caption.split(" ")
        k = rng.randrange(len(words))
        pairs.append((" ".join(words[:k]), "", " ".join(words[k:]) + EOS))
    pairs += [(source, "", f"{target}{EOS}") for (source,), target in paraphrases(split, rng)]
    reading = [(context, FAMILIES["t5"].vqa_prompt.format(q), f" {majority_answer(ten)}{EOS}")
               for context, q, ten, _ in qa_with_context(split, rng)]
    return pairs + reading * T5_READING_REPEATS


# ----------------------------------------------------------------------------- batches


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows])


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, each distinct text tokenised once: the corpora repeat their texts
    (T5's 84,000 prompts are 186 questions; its corpus took 6.5 s to tokenise, now 1.3 s)."""
    distinct = list(dict.fromkeys(texts))
    ids = dict(zip(distinct, tokenizer(distinct)["input_ids"])) if distinct else {}
    return [ids[t] for t in texts]


def t5_encoder_batch(sources: list[list[int]], pad_id: int) -> dict:
    """T5's encoder ``input_ids`` and ``attention_mask`` for ``sources``, padded on the right."""
    # An empty source (a prefix-LM split at k = 0) becomes one visible pad token: the encoder
    # needs at least one position, and the decoder learns to start a caption from "nothing".
    sources = [s or [pad_id] for s in sources]
    return {"input_ids": pad_rows(sources, pad_id), "attention_mask": pad_rows([[1] * len(s) for s in sources], 0)}


def t5_batch(sources: list[list[int]], prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    """Encoder ``sources``; the decoder reads ``[start; prompt; target]`` (pad is T5's start token)
    and is scored on the target only. T5 would shift the labels itself, but it turns the prompt's
    -100 labels into pads, so the decoder's inputs are given."""
    decoder_rows = [[pad_id] + (p + t)[:-1] for p, t in zip(prompts, targets)]
    return {**t5_encoder_batch(sources, pad_id), "decoder_input_ids": pad_rows(decoder_rows, pad_id),
            "decoder_attention_mask": pad_rows([[1] * len(r) for r in decoder_rows], 0),
            "labels": pad_rows([[-100] * len(p) + t for p, t in zip(prompts, targets)], -100)}


def _rows_and_starts(documents: list[list[int]], eos_id: int, rng: torch.Generator | None):
    """Each document after an eos, and the position of its first token: random in
    ``[0, OPT_SEQ_LEN - length]`` with ``rng``, else 0."""
    rows = [[eos_id] + d for d in documents]
    too_long = max(len(r) for r in rows)
    if too_long > OPT_SEQ_LEN:
        raise ValueError(f"a document of {too_long} tokens exceeds OPT's {OPT_SEQ_LEN} positions")
    if rng is None:
        return rows, torch.zeros(len(rows), dtype=torch.long)
    room = torch.tensor([OPT_SEQ_LEN - len(r) + 1 for r in rows])
    return rows, (torch.rand(len(rows), generator=rng) * room).long()


def opt_batch(documents: list[list[int]], eos_id: int, pad_id: int, rng: torch.Generator | None = None) -> dict:
    """Documents, each after an eos (OPT's own tokenizer starts every text with ``</s>``), one per row,
    padded on the right. With ``rng`` each row starts at a random position in ``[0, OPT_SEQ_LEN -
    length]``; without, at 0. Every token of every document is a target."""
    rows, starts = _rows_and_starts(documents, eos_id, rng)
    input_ids = pad_rows(rows, pad_id)
    attention_mask = pad_rows([[1] * len(r) for r in rows], 0)
    # Padding sits after the text, so its positions (clamped to stay in range) are never read.
    position_ids = (starts[:, None] + torch.arange(input_ids.shape[1])).clamp(max=OPT_SEQ_LEN - 1)
    labels = pad_rows(rows, -100)
    labels[:, 0] = -100  # the eos only conditions: the model shifts the labels itself
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most ``capacity`` summed length (first-fit decreasing)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if fits is None:
            fits = len(bins)
            bins.append([])
            room.append(capacity)
        bins[fits].append(i)
        room[fits] -= lengths[i]
    return bins


def opt_packed_batch(documents: list[list[int]], eos_id: int, pad_id: int, rng: torch.Generator | None = None) -> dict:
    """What ``opt_batch`` computes, without its padding: the same documents at the same positions,
    several to a row of at most ``OPT_SEQ_LEN`` tokens, each attending only to its own earlier
    tokens through a 4-D mask, so the loss and its gradients are the same (tests/test_lite_llm.py).
    In the course's batches 45% of ``opt_batch``'s tokens are padding; packed, a pretraining step
    is 1.6x faster (README)."""
    rows, starts = _rows_and_starts(documents, eos_id, rng)
    bins = pack([len(r) for r in rows], OPT_SEQ_LEN)
    width = max(sum(len(rows[i]) for i in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id)
    position_ids = torch.zeros(len(bins), width, dtype=torch.long)
    labels = torch.full((len(bins), width), -100)
    segment = torch.full((len(bins), width), -1)  # which document of the row a token belongs to
    for b, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members):
            n = len(rows[i])
            input_ids[b, at:at + n] = torch.tensor(rows[i])
            position_ids[b, at:at + n] = starts[i] + torch.arange(n)
            labels[b, at + 1:at + n] = input_ids[b, at + 1:at + n]  # the eos only conditions
            segment[b, at:at + n] = s
            at += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    allowed |= torch.eye(width, dtype=torch.bool)  # padding sees itself: no softmax over nothing
    # transformers' OPT takes a 4-D additive mask as it is
    attention_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def tokenized_examples(family: str, tokenizer, split, seed: int):
    """The split's documents (decoder-only) or pairs (encoder-decoder), tokenised."""
    if not llm_family(family).encoder_decoder:
        return encode(tokenizer, opt_documents(split, seed))
    sources, prompts, targets = zip(*t5_pairs(split, seed))
    return list(zip(*(encode(tokenizer, list(texts)) for texts in (sources, prompts, targets))))


def collate(family: str, tokenizer, examples) -> dict:
    if not llm_family(family).encoder_decoder:
        return opt_batch(examples, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return t5_batch(*map(list, zip(*examples)), tokenizer.pad_token_id)


def opt_sampler(documents: list[list[int]], eos_id: int, pad_id: int, batch_size: int):
    # Documents drawn at random, then packed: batches grouped by length instead (transformers'
    # LengthGroupedSampler) cost a quarter less, but OPT then never learned to copy.
    def sample(rng: torch.Generator) -> dict:
        chosen = torch.randint(len(documents), (batch_size,), generator=rng).tolist()
        return opt_packed_batch([documents[i] for i in chosen], eos_id, pad_id, rng)

    return sample


def t5_sampler(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int, batch_size: int):
    def sample(rng: torch.Generator) -> dict:
        chosen = torch.randint(len(pairs), (batch_size,), generator=rng).tolist()
        return t5_batch(*map(list, zip(*(pairs[i] for i in chosen))), pad_id)

    return sample
