"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap's scorers.

As ``COCOEvalCap.evaluate`` (pycocoevalcap 1.2, ``pycocoevalcap/eval.py``, the coco-caption code
LAVIS's captioning task runs) computes them: references and predictions are tokenised by Stanford's
PTBTokenizer (Java; lower-cased, punctuation dropped), then each scorer's
``compute_score(gts, res)`` runs on ``gts = {id: [references]}`` and ``res = {id: [prediction]}``.
The scorers are called one by one here because ``COCOEvalCap.evaluate`` always builds SPICE as
well, which fails offline (``SPICE_NOTE``). METEOR runs in a Java process
(``java -jar meteor-1.5.jar``) that loads a paraphrase table before its first score (about 5 s on
2 CPU cores): one process serves every METEOR score of a Python session (``meteor_scorer``).
"""

from __future__ import annotations

import atexit
import shutil
import threading

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from .captioning import check_captions

SCORERS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
SPICE_NOTE = ("SPICE is not reported: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 on first use, "
              "which this offline evaluation cannot do.")
JAVA_NOTE = ("the COCO caption metrics need Java (PTBTokenizer and METEOR are Java programs) and no `java` is on "
             "the PATH: install a Java runtime, e.g. `apt-get install openjdk-17-jre-headless` or "
             "`conda install -c conda-forge openjdk`")


_meteor: Meteor | None = None


def meteor_scorer() -> Meteor:
    """pycocoevalcap's ``Meteor``, started on first use and shared by later calls: each score is of
    the statistics sent in its own ``compute_score`` call, so sharing the process changes no score,
    only skips loading the paraphrase table again. Stopped at exit, or by ``close_meteor``."""
    global _meteor
    if _meteor is None:
        if shutil.which("java") is None:
            raise RuntimeError(JAVA_NOTE)
        _meteor = Meteor()
    return _meteor


def close_meteor() -> None:
    """Stop the shared METEOR process (a later ``meteor_scorer`` starts a new one)."""
    global _meteor
    if _meteor is not None:
        scorer, _meteor = _meteor, None
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.lock = threading.Lock()  # an interrupted compute_score never released the old one: its
        # __del__ (which stops the process again, harmlessly) would wait for it forever


atexit.register(close_meteor)


def _one_line(text: str) -> str:
    # PTBTokenizer reads one caption per line and pycocoevalcap zips its output lines with the ids:
    # a line break inside a caption ("\r", "\u2028", ...) would shift every later caption's id.
    return " ".join(text.splitlines())


def tokenize(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """``(gts, res)`` as ``COCOEvalCap.evaluate`` builds them, ids ``0..N-1`` in the given order:
    one PTBTokenizer run (one Java start) for references and predictions together."""
    captions = {("ref", i): [{"caption": _one_line(r)} for r in refs] for i, refs in enumerate(references)}
    captions |= {("hyp", i): [{"caption": _one_line(p)}] for i, p in enumerate(predictions)}
    tokens = PTBTokenizer().tokenize(captions)
    if any(len(tokens.get(key, ())) != len(value) for key, value in captions.items()):
        raise RuntimeError("PTBTokenizer returned a different number of captions than it was given")
    gts = {i: tokens[("ref", i)] for i in range(len(references))}
    res = {i: tokens[("hyp", i)] for i in range(len(predictions))}
    return gts, res


def coco_caption_scores(predictions: list[str], references: list[list[str]], metrics=SCORERS) -> dict[str, float]:
    """Corpus-level COCO caption metrics, x100 as papers print them: ``Bleu_1`` .. ``Bleu_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr`` (CIDEr-D), named as ``COCOEvalCap`` names them.

    ``predictions[i]`` is the caption of image i and ``references[i]`` its reference captions.
    Score a whole split in one call: CIDEr-D takes its n-gram document frequencies from the
    references of the set it is given (a single image's caption scores 0), and BLEU's brevity
    penalty is computed over the corpus. ``metrics`` picks scorers from ``SCORERS``; METEOR is the
    slow one (its Java process loads a paraphrase table). SPICE is never reported (``SPICE_NOTE``).
    """
    check_captions(predictions, references)
    if "SPICE" in metrics:
        raise ValueError(SPICE_NOTE)
    unknown = set(metrics) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {SCORERS}")
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_NOTE)
    gts, res = tokenize(predictions, references)
    out = {}
    if "Bleu" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out |= {f"Bleu_{n}": 100 * float(b) for n, b in enumerate(bleu, start=1)}
    if "METEOR" in metrics:
        try:
            out["METEOR"] = 100 * float(meteor_scorer().compute_score(gts, res)[0])
        except BaseException:
            close_meteor()  # a process interrupted mid-exchange would answer the next call out of step
            raise
    if "ROUGE_L" in metrics:
        out["ROUGE_L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    return out
