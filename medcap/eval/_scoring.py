"""Scoring: the captioning metrics (pycocoevalcap) and OmniMedVQA's answer scoring.

Captioning metrics through pycocoevalcap's own scorers, after its PTB tokenizer:
BLEU-1..4, METEOR, ROUGE-L and CIDEr (SPICE left out, as in the reference).

Scoring OmniMedVQA answers: the reference's letter mapping, or the model's own
option log-likelihoods; macro accuracy over modalities, saved and drawn.

Letter mapping (``eval_vqa`` of the reference): for each row a text-only chat
(no image, at most 20 new tokens) is asked which option our free answer means,
with the question the row was made from (from the data set by question id; for
a file with no such id, read back from the ``instruction``). ``predict`` is the
reply's first character, upper-cased (empty for an empty reply); the row is
correct when that letter's position among A-D is the position of the first
option equal to ``gt_answer`` (the ``output`` column): the reference's rule, so
a letter outside A-D, or one naming an empty option, is wrong. (The reference
left the previous row's prediction in ``predict`` after an empty reply, and
crashed when the first reply was empty.)

Log-likelihood (``vqa_scoring=loglik``): the answer prompt of each row is
rebuilt from its ``instruction`` (with the image), and each option is scored as
the assistant's whole answer (its tokens, then ``<|eot_id|>``); the letter of
the best option is ``predict``. No second generation; ``predict_generated``
holds the scores.

Scored files are ``{raw}-{round(acc, 4)}.csv`` (``{raw}-loglik-...`` for
loglik), UTF-8 with BOM, as the reference names and writes them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from medcap._io import atomic_write_text, progress as progress_bar
from medcap.data import BadSample
from medcap.eval._loop import OPTION_LETTERS, CsvJournal, accuracy_name, write_csv_atomic
from medcap.generation import prompt_tokens_from_text, question_from_instruction

# ---- Captioning metrics ----------------------------------------------------------

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
    from medcap._io import quiet_stderr_fd

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
    from medcap._io import atomic_write_text

    return atomic_write_text(Path(path), "".join(f"{k},{v:.6f}\n" for k, v in scores.items()))


# ---- OmniMedVQA scoring ----------------------------------------------------------

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("predict_generated", "predict", "correct")
LETTER_MAX_NEW_TOKENS = 20
LETTER_INSTRUCTION = (
    "Based on the question and our answer, respond with only the letter of the correct option from the given choices."
)
SCORING_METHODS = ("letter", "loglik")


def row_options(row: Dict[str, str]) -> Dict[str, str]:
    """The options a row offers (A and B always; C and D when present)."""
    out = OrderedDict()
    for L in OPTION_LETTERS:
        v = row.get(f"option_{L}", "")
        if L in ("A", "B") or v != "":
            out[L] = v
    return out


def letter_prompt(question: str, generated: str, options: Dict[str, str]) -> str:
    """The reference's mapping question, character for character: A and B, and when
    C or D is given, the C and D lines both (an absent one left empty)."""
    text = f"Question: {question}\nOur answer: {generated}\nA. {options.get('A', '')}\nB. {options.get('B', '')}\n"
    if options.get("C", "") != "" or options.get("D", "") != "":
        text += f"C. {options.get('C', '')}\nD. {options.get('D', '')}\n"
    return text + "\n" + LETTER_INSTRUCTION


def read_letter(reply: str) -> str:
    """``predict``: the reply's first character, upper-cased; empty for an empty reply."""
    reply = (reply or "").strip()
    return reply[0].upper() if reply else ""


def is_correct(letter: str, options: Dict[str, str], answer: str) -> int:
    """The reference's rule: the letter's position among A-D equals the position of the
    first option (A-D, absent ones empty) whose text is the answer."""
    texts = [options.get(L, "") for L in OPTION_LETTERS]
    if letter not in OPTION_LETTERS or answer not in texts:
        return 0
    return int(OPTION_LETTERS.index(letter) == texts.index(answer))


def accuracy_by_modality(rows: Sequence[Dict[str, str]], group: str = "modality_type") -> Tuple[float, Dict[str, Dict[str, float]]]:
    """Macro accuracy (mean of per-modality accuracies) and the per-modality table."""
    groups: Dict[str, List[int]] = OrderedDict()
    for r in rows:
        groups.setdefault(r.get(group, "") or "all", []).append(int(r["correct"]))
    per = {
        g: {"n": len(v), "correct": int(sum(v)), "accuracy": sum(v) / len(v)}
        for g, v in sorted(groups.items())
    }
    macro = sum(p["accuracy"] for p in per.values()) / len(per) if per else float("nan")
    return macro, per


def _key(i: int, row: Dict[str, str]) -> str:
    return f"score:{i}:{row.get('question_id', '')}"


def _question(row: Dict[str, str], questions: Optional[Dict[str, str]]) -> str:
    qid = row.get("question_id", "")
    if questions is not None and qid in questions:
        return questions[qid]
    return question_from_instruction(row["instruction"])  # a file made elsewhere: read it back


def score_letter(
    engine, rows: Sequence[Dict[str, str]], journal: CsvJournal, *, progress: bool = True,
    questions: Optional[Dict[str, str]] = None,
) -> None:
    done = len(journal)
    bar = progress_bar(len(rows) - done, "scoring (letter)", "q", enabled=progress)
    chunk = getattr(engine, "chunk_size", engine.batch_size)  # several batches: continuous batching refills slots
    for lo in range(done, len(rows), chunk):
        batch = rows[lo : lo + chunk]
        prompts, opts = [], []
        for r in batch:
            options = row_options(r)
            opts.append(options)
            question = _question(r, questions)
            prompts.append(engine.prompt(letter_prompt(question, r["generated"], options), has_image=False))
        replies = engine.generate_texts(
            prompts, [None] * len(batch), LETTER_MAX_NEW_TOKENS, [_key(lo + k, r) for k, r in enumerate(batch)]
        )
        out = []
        for r, options, reply in zip(batch, opts, replies):
            letter = read_letter(reply)
            out.append({**r, "predict_generated": reply, "predict": letter, "correct": is_correct(letter, options, r["output"])})
        journal.append(out)
        bar.update(len(batch))
    bar.close()


def score_loglik(
    engine,
    rows: Sequence[Dict[str, str]],
    journal: CsvJournal,
    image_loader: Callable[[str], torch.Tensor],
    *,
    progress: bool = True,
    reduction: str = "sum",
) -> None:
    done = len(journal)
    bar = progress_bar(len(rows) - done, "scoring (loglik)", "q", enabled=progress)
    for lo in range(done, len(rows), engine.batch_size):
        batch = rows[lo : lo + engine.batch_size]
        prompts, images, opts = [], [], []
        for r in batch:
            tokens, has_image = prompt_tokens_from_text(engine.tokenizer, r["instruction"], num_image_tokens=engine.num_image_tokens)
            image = None
            if has_image:
                try:
                    image = image_loader(r["image"])
                except BadSample as e:
                    raise BadSample(f"cannot score row {lo}: {e.reason}") from e
            prompts.append(tokens)
            images.append(image)
            opts.append({L: v for L, v in row_options(r).items() if v != ""})
        scores = engine.score_options(prompts, images, [list(o.values()) for o in opts], reduction=reduction)
        out = []
        for r, o, s in zip(batch, opts, scores):
            letters = list(o)
            best = max(range(len(s)), key=lambda k: s[k]) if s else None
            letter = letters[best] if best is not None else ""
            out.append(
                {
                    **r,
                    "predict_generated": json.dumps({L: round(v, 6) for L, v in zip(letters, s)}),
                    "predict": letter,
                    "correct": is_correct(letter, row_options(r), r["output"]),
                }
            )
        journal.append(out)
        bar.update(len(batch))
    bar.close()


def score_file(
    engine,
    raw_path: str | Path,
    *,
    method: str = "letter",
    image_loader: Optional[Callable[[str], torch.Tensor]] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    questions: Optional[Dict[str, str]] = None,
) -> Dict[str, object]:
    """Score a raw OmniMedVQA file; writes ``{raw}-{round(acc, 4)}.csv`` (``{raw}-loglik-...``
    for ``loglik``) and the per-modality CSV, JSON and PNG beside it. Resumable
    through ``{raw}-scored.partial.csv``. ``questions`` maps question ids to the
    questions the rows were made from. Returns a summary dict."""
    from medcap.eval._loop import read_csv_rows

    if method not in SCORING_METHODS:
        raise ValueError(f"vqa_scoring must be one of {list(SCORING_METHODS)}, got {method!r}")
    raw_path = Path(raw_path)
    rows = read_csv_rows(raw_path)
    if not rows:
        log.warning("%s holds no rows: nothing to score", raw_path)
        return {"accuracy": float("nan"), "per_modality": {}, "rows": 0}
    columns = list(rows[0].keys()) + list(SCORE_COLUMNS)
    tag = "" if method == "letter" else "-loglik"
    partial = raw_path.with_name(f"{raw_path.stem}{tag}-scored.partial.csv")
    journal = CsvJournal(None, columns, partial=partial, bom=True)
    if len(journal) > len(rows) or any(
        a.get(c) != b.get(c) for a, b in zip(journal.rows(), rows) for c in ("instruction", "generated", "output")
    ):
        raise ValueError(f"{partial} does not match {raw_path}; move it away to score again")
    if method == "letter":
        score_letter(engine, rows, journal, progress=progress, questions=questions)
    else:
        if image_loader is None:
            raise ValueError("loglik scoring needs an image_loader")
        score_loglik(engine, rows, journal, image_loader, progress=progress)
    scored = journal.rows()
    acc, per = accuracy_by_modality(scored)
    final = raw_path.with_name(f"{raw_path.stem}{tag}-{accuracy_name(acc)}.csv")
    journal.finish(final)
    outputs = save_modality_report(final, acc, per, method=method)
    print_modality_report(acc, per, title=f"{final.name}")
    return {"accuracy": acc, "per_modality": per, "rows": len(scored), "scored_path": str(final), **outputs}


def print_modality_report(acc: float, per: Dict[str, Dict[str, float]], title: str = "") -> None:
    lines = [f"accuracy per modality{(' (' + title + ')') if title else ''}:"]
    for g, p in per.items():
        lines.append(f"  {g:<40s} {p['accuracy']:.4f}  ({p['correct']}/{p['n']})")
    lines.append(f"  {'macro accuracy':<40s} {acc:.4f}")
    odd = [g for g in per if g in ("MR (Mag-netic Resonance Imaging)", "OCT (Optical Coherence Tomography")]
    if odd:
        lines.append("  (modality names are OmniMedVQA's own spellings, kept so that results match the data set: "
                     + ", ".join(repr(g) for g in odd) + ")")
    print("\n".join(lines), flush=True)


def save_modality_report(scored_path: Path, acc: float, per: Dict[str, Dict[str, float]], *, method: str) -> Dict[str, str]:
    """``{scored}-modality.csv`` / ``.json`` / ``.png`` next to the scored file."""
    # Built by name: with_suffix would take ".4567-modality" for the suffix.
    stem = scored_path.stem + "-modality"
    csv_path = write_csv_atomic(
        scored_path.with_name(stem + ".csv"),
        ["modality_type", "n", "correct", "accuracy"],
        [{"modality_type": g, "n": p["n"], "correct": p["correct"], "accuracy": f"{p['accuracy']:.6f}"} for g, p in per.items()],
    )
    json_path = scored_path.with_name(stem + ".json")
    atomic_write_text(json_path, json.dumps({"scoring": method, "macro_accuracy": acc, "per_modality": per},
                                            indent=1, ensure_ascii=False))
    png_path = scored_path.with_name(stem + ".png")
    draw_modality_chart(png_path, acc, per, title=scored_path.stem)
    return {"modality_csv": str(csv_path), "modality_json": str(json_path), "modality_png": str(png_path)}


def draw_modality_chart(path: Path, acc: float, per: Dict[str, Dict[str, float]], title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(per)
    vals = [per[n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    bars = ax.bar(range(len(names)), vals, color="#4C72B0")
    for b, n in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, f"{per[n]['accuracy']:.2f}\nn={per[n]['n']}",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(acc, color="#C44E52", linestyle="--", label=f"macro accuracy {acc:.4f}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
