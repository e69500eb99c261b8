"""The text prompts BLIP-2 gives its frozen LLM (the paper, section 4.2, and LAVIS's configs)."""

PROMPTS = {
    "caption": "a photo of",
    "vqa_opt": "Question: {} Answer:",
    "vqa_t5": "Question: {} Short answer:",
}


def conversation_prompt(turns: list[tuple[str, str]], question: str) -> str:
    """Multi-turn instructed generation (the paper's Figure 4): earlier ``(question, answer)``
    turns, then the new question, in the VQA template."""
    history = " ".join(f"Question: {q} Answer: {a}" for q, a in turns)
    return f"{history} Question: {question} Answer:".strip()
