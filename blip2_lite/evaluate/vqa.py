"""VQA accuracy as VQAv2 scores it: an answer is right to the degree that annotators gave it.

Normalisation and scoring follow the official VQA evaluation script (Antol et al., 2015;
``GT-Vision-Lab/VQA``, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, last changed 2021-03-11)
and LAVIS's copy of its older version (``lavis/common/vqa_tools/vqa_eval.py``), which scores
BLIP-2's VQAv2 numbers. An answer is normalised as ``processPunctuation`` then
``processDigitArticle`` do it: punctuation deleted or turned into spaces, a ``.`` not followed by a
digit removed, lower case, number words to digits, articles dropped, the script's contractions
restored. The score of a prediction is the mean over the n leave-one-annotator-out subsets of
min(1, matches among the other n - 1 answers / 3).

The scripts differ in *when* they normalise (``protocol``):

* ``"official"`` (2021): prediction and answers are only stripped when the answers all agree, and
  fully normalised otherwise. VQAv2's released answers are already normalised, so there a
  prediction "Two" scores 0 against ten "2".
* ``"lavis"``: the prediction is always fully normalised; the answers, when they differ, only get
  ``processPunctuation`` (so "dog" does not match "a dog").
* ``"symmetric"`` (the default): prediction and answers are always fully normalised. It equals
  ``"official"`` whenever the answers differ and credits "Two" against ten "2" as LAVIS does; it is
  the protocol for answers written by people (or the shapes world), which are not normalised yet.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

PROTOCOLS = ("symmetric", "official", "lavis")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = {word: str(i) for i, word in enumerate(NUMBER_WORDS)} | {"none": "0"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The script's own table, copied as it is (its capitalised keys can never match lower-cased words).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

# The script writes "(?!<=\d)(\.)(?!\d)", a look-behind typo that never fires: every "." not
# followed by a digit goes.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The script's ``processPunctuation``: a mark next to a space, or any mark once the text has a
    digit-comma-digit ("1,000"), is deleted; otherwise it becomes a space ("t-shirt" -> "t shirt")."""
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or _DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The script passes re.UNICODE (32) where sub() takes its count: at most 32 periods go.
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """The script's ``processDigitArticle``: lower case, number words to digits, articles dropped,
    contractions restored ("dont" -> "don't")."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


@functools.lru_cache(maxsize=1 << 16)  # answers repeat: a question's 10 are a few strings, a split's a few thousand
def normalize_answer(answer: str) -> str:
    """The full VQAv2 normalisation: "The two dogs." -> "2 dogs", "1,000" -> "1000"."""
    return process_digit_article(process_punctuation(_strip(answer)))


def _check(prediction, answers, protocol: str) -> None:
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a string, got {type(prediction).__name__}")
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of strings (VQAv2 has 10 per question)")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"answers[{i}] must be a string, got {type(answer).__name__}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def vqa_accuracy(prediction: str, answers: list[str], protocol: str = "symmetric") -> float:
    """VQAv2 accuracy: mean over the annotators of min(1, matches among the *other* answers / 3).

    So 3 matching answers of 10 score (7 * 1 + 3 * 2/3) / 10 = 0.9, and 4 or more score 1.
    ``protocol`` chooses what is normalised, and when (module docstring).
    """
    _check(prediction, answers, protocol)
    if protocol == "official":
        prediction, answers = _strip(prediction), [_strip(a) for a in answers]
        if len(set(answers)) > 1:
            prediction, answers = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    elif protocol == "lavis":
        prediction = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
    else:
        prediction, answers = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    hits = [a == prediction for a in answers]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(hits)


def majority_answer(answers: list[str]) -> str:
    """The most common normalised answer (ties: alphabetical), e.g. a training target."""
    counts = Counter(normalize_answer(a) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


def vqa_scores(predictions: list[str], answers: list[list[str]], question_types: list[str],
               protocol: str = "symmetric") -> dict[str, float]:
    """VQA accuracy (%) overall (``vqa_overall``) and per question type (``vqa_<type>``), the keys of
    ``lite.shapes_world.chance_levels``."""
    if not len(predictions) == len(answers) == len(question_types):
        raise ValueError("predictions, answers and question_types differ in length")
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    scores = []
    for i, (prediction, ten) in enumerate(zip(predictions, answers)):
        try:
            scores.append(vqa_accuracy(prediction, ten, protocol))
        except ValueError as error:  # say which question
            raise ValueError(f"question {i}: {error}") from None
    out = {"vqa_overall": 100 * sum(scores) / len(scores)}
    for kind in sorted(set(question_types)):
        picked = [s for s, t in zip(scores, question_types) if t == kind]
        out[f"vqa_{kind}"] = 100 * sum(picked) / len(picked)
    return out
