"""Captioning metrics through pycocoevalcap's own scorers, after its PTB tokenizer:
BLEU-1..4, METEOR, ROUGE-L and CIDEr (SPICE left out, as in the reference)."""

from __future__ import annotations

import contextlib
import io
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Sequence

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class JavaNotFoundError(RuntimeError):
    """pycocoevalcap's PTB tokenizer and METEOR run ``java``, which is not on PATH."""


def check_java() -> str:
    """Path of ``java``, or a :class:`JavaNotFoundError` saying what to install."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "captioning metrics need Java: pycocoevalcap's PTB tokenizer and METEOR run `java`, "
            "which is not on PATH. Install a Java runtime (e.g. `sudo apt-get install default-jre-headless`, "
            "or `conda install -c conda-forge openjdk`, or run scripts/ensure_java.sh) and run again."
        )
    return java


_METEOR = None
_METEOR_LOCK = threading.Lock()


def _meteor():
    """One METEOR JVM per process: starting it (loading its paraphrase tables)
    costs seconds, and the scorer can be reused."""
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR = Meteor()
        return _METEOR


def caption_metrics(references: Sequence[str], candidates: Sequence[str]) -> Dict[str, float]:
    """Corpus scores of ``candidates`` against one reference each, in
    :data:`METRIC_NAMES` order."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if not references:
        raise ValueError("no captions to score")
    check_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": str(r)}] for i, r in enumerate(references)}
    res = {i: [{"caption": str(c)}] for i, c in enumerate(candidates)}
    from medcap._progress import quiet_stderr_fd

    tok = PTBTokenizer()
    with quiet_stderr_fd():  # the Java tokenizer's "PTBTokenizer tokenized N tokens" chatter
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    # The PTB tokenizer drops trailing empty lines, so empty captions can go missing.
    for d in (gts_t, res_t):
        for i in range(len(references)):
            d.setdefault(i, [""])
    scores: Dict[str, float] = OrderedDict()
    for scorer, names in ((Bleu(4), METRIC_NAMES[:4]), (_meteor(), ("METEOR",)), (Rouge(), ("ROUGE_L",)), (Cider(), ("CIDEr",))):
        with contextlib.redirect_stdout(io.StringIO()), quiet_stderr_fd():  # BLEU's internals, METEOR's JVM
            value, _ = scorer.compute_score(gts_t, res_t)
        if isinstance(value, (list, tuple)):
            for n, v in zip(names, value):
                scores[n] = float(v)
        else:
            scores[names[0]] = float(value)
    return scores


def write_metrics_csv(path: str | Path, scores: Dict[str, float]) -> Path:
    """One ``metric,score`` line per metric, scores with 6 decimals (the reference's file)."""
    from medcap._fs import atomic_write_text

    return atomic_write_text(Path(path), "".join(f"{k},{v:.6f}\n" for k, v in scores.items()))
