"""The field's VQA benchmarks as suites: SLAKE, PathVQA, VQA-RAD (Hugging Face), PMC-VQA
and your own questions, read (``_benchmark_readers``), answered with the reference's
two-step protocol (``_protocol``), scored by medcap's rules (``_benchmark_scores``) and
each peer's convention (``_conventions``), open answers judged by an LLM when a judge
is given (``_llm_judge``).

In this file, in the order of a run: ``BenchmarkSuite`` (what ``recipes/generate.py``
calls, step by step: ``read``, ``make_rows``, ``score``, ``report``), ``run_benchmark``
(it, whole), and ``score_benchmark`` (a raw file scored).

Files in ``output_dir`` (columns in datasets/README.md): ``{prefix}-{vqa_type}-raw-{ckpt}.csv``,
the scored ``{raw}-{np.round(overall, 4)}.csv`` (``SCORED_COLUMNS``: medcap's cells, the
peers' cells, the judge's verdict, empty with the judge off) and ``{raw}-summary.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from medcap._io import atomic_write_text
from medcap.eval._benchmark_readers import BENCHMARKS, ParquetImages, Report, benchmark_loader, read_benchmark, skip
from medcap.eval._benchmark_scores import CONVENTION, HEADLINE, ROW_SCORE_COLUMNS, row_scores, summarize
from medcap.eval._choices import SCORING_METHODS, open_scoring, score_choices
from medcap.eval._conventions import BENCHMARK_COLUMNS, headlines, row_cells
from medcap.eval._protocol import TwoStepVQA, check_vqa_type
from medcap.eval._results import accuracy_name, read_csv_rows, write_csv_atomic
from medcap.eval._run import EvalItem, SuiteRun, drop_missing_images, loader_by_image, run_suite

EXTRA_COLUMNS = ("question", "answer", "answer_type", "option_A", "option_B", "option_C", "option_D", "question_id")
CHOICE_COLUMNS = ("predict_generated", "predict")
JUDGE_COLUMNS = ("judge_verdict", "judge_reply")
SCORED_COLUMNS = CHOICE_COLUMNS + ROW_SCORE_COLUMNS + BENCHMARK_COLUMNS + JUDGE_COLUMNS  # after the raw columns
QUESTION_SETS = {  # what the question-set options make comparable, said when a suite reads its questions
    ("test_slake", "all"): "English and Chinese questions: the set MedEvalKit's table scores (q_lang=en: LLaVA-Med's)",
    ("test_slake", "en"): "English questions: the set LLaVA-Med's table scores (q_lang=all: MedEvalKit's)",
    ("test_slake", "zh"): "Chinese questions only: no published table scores this set alone",
}

# ---- The suite


class BenchmarkSuite:
    """One of ``BENCHMARKS``: read, answer (two-step protocol), score and summarise;
    with several ranks, each answers its share and rank 0 scores."""

    def __init__(self, run: SuiteRun, name: str, *, dataset_source: str, vqa_type: str, max_seq_len: int,
                 max_new_tokens: int, scoring: str = "letter", q_lang: str = "all", pmcvqa_file: str = "auto",
                 judge=None, judge_concurrency: int = 4):
        check_vqa_type(vqa_type)
        self.bench = BENCHMARKS[name]
        self.run, self.name, self.dataset_source = run, name, dataset_source
        self.vqa_type, self.scoring, self.q_lang, self.pmcvqa_file = vqa_type, scoring, q_lang, pmcvqa_file
        self.judge, self.judge_concurrency = judge, judge_concurrency  # a JudgeClient (_llm_judge) or None
        self.raw_path = run.results_path(f"{self.bench.prefix}-{vqa_type}-raw-{run.ckpt}.csv")
        identity = {**run.identity, "suite": name}
        if name == "test_slake":
            identity["q_lang"] = q_lang
        self.protocol = TwoStepVQA(vqa_type, raw_path=self.raw_path, identity=identity, max_seq_len=max_seq_len,
                                   max_new_tokens=max_new_tokens, extra_columns=EXTRA_COLUMNS, ranks=run.ranks)
        self.columns, self.identity, self.unit = self.protocol.columns, self.protocol.identity, self.protocol.unit
        self.load_image = run.image_loader  # images inside parquet files: decoded in memory (read)
        self.items: List[EvalItem] = []
        self.data_report: Report = {}

    def read(self) -> List[EvalItem]:
        """The questions whose image is there, cut to ``run.limit``; what was skipped, printed."""
        items, self.data_report, images = read_benchmark(self.name, self.dataset_source, q_lang=self.q_lang,
                                                         pmcvqa_file=self.pmcvqa_file)
        items = _drop_missing_files(items, images, self.data_report)
        if self.run.limit is not None:
            items = items[: self.run.limit]
        _print_skipped(self.bench.title, self.data_report)
        _print_question_set(self.name, self.q_lang, self.data_report)
        self.load_image = benchmark_loader(self.run.image_loader, images)
        self.items = items
        return items

    def make_rows(self, engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        """Each question asked in the protocol's two steps (``TwoStepVQA.make_rows``)."""
        return self.protocol.make_rows(engine, items, images)

    def score(self, engine, rows: Sequence[Dict[str, str]], left_out: Dict[str, str]) -> Dict[str, Any]:
        """The raw file on disk, scored (``score_benchmark``); the summary written beside it."""
        summary = score_benchmark(engine, self.raw_path, scoring=self.scoring, progress=self.run.progress,
                                  image_loader=loader_by_image(self.items, self.load_image), judge=self.judge,
                                  judge_concurrency=self.judge_concurrency)
        summary.update(suite=self.name, benchmark=self.bench.title, ckpt=self.run.ckpt, vqa_type=self.vqa_type,
                       scoring=self.scoring, q_lang=self.q_lang if self.name == "test_slake" else None,
                       report=self.data_report, left_out_unreadable_images=left_out)
        summary_path = self.raw_path.with_name(self.raw_path.stem + "-summary.json")
        atomic_write_text(summary_path, json.dumps(summary, indent=1, ensure_ascii=False, default=str))
        return {"raw_path": str(self.raw_path), "summary_path": str(summary_path), "rows": len(rows), **summary}

    def report(self, result: Dict[str, Any]) -> None:
        """One line: the overall score and each question type's."""
        s = result["scores"]
        parts = [f"overall {s[HEADLINE]:.4f}" if s.get(HEADLINE) is not None else "overall -"]
        if "closed" in s:
            parts.append(f"closed acc {s['closed']['accuracy']:.4f} (n={s['closed']['n']})")
        if "open" in s:
            o = s["open"]
            parts.append(f"open exact {o['exact_match']:.4f} recall {o['token_recall']:.4f} f1 {o['token_f1']:.4f} (n={o['n']})")
        if "choice" in s:
            parts.append(f"choice acc {s['choice']['accuracy']:.4f} (n={s['choice']['n']})")
        if result.get("left_out_unreadable_images"):
            parts.append(f"{len(result['left_out_unreadable_images'])} unreadable image(s) left out (retried next run)")
        print(f"{self.bench.title} [medcap]: " + "; ".join(parts) + f"  [{Path(result['scored_path']).name}]", flush=True)
        print(f"{self.bench.title} [peers]: " + convention_line(result["conventions"], result["judge"]), flush=True)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def convention_line(conventions: Dict[str, Any], judge: Any) -> str:
    """The peers' headlines of one file in a line, the judge named (or "judge: off")."""
    mek, parts = conventions.get("medevalkit", {}), []
    parts.append(f"medevalkit overall {_pct(mek.get('overall'))}")
    if "judged_overall" in mek:
        parts.append(f"medevalkit+judge overall {_pct(mek['judged_overall'])} ({mek['judged_rows']} rows judged)")
    lm = conventions.get("llava_med")
    if lm and (lm["n_open"] or lm["n_closed"]):
        parts.append(f"llava_med open recall {_pct(lm['open_recall'])} closed acc {_pct(lm['closed_accuracy'])}")
    if "huatuo" in conventions:
        parts.append(f"huatuo acc {_pct(conventions['huatuo']['accuracy'])}")
    parts.append("judge: off" if judge == "off" else f"judge: {judge['model']} at {judge['endpoint']}")
    return "; ".join(parts)


def run_benchmark(engine, suite: str, run: SuiteRun, **settings) -> Dict[str, Any]:
    """Read, answer, score and summarise one suite: ``BenchmarkSuite(run, suite, **settings)``, whole."""
    return run_suite(engine, BenchmarkSuite(run, suite, **settings), run)


def _drop_missing_files(items: List[EvalItem], images: Optional[ParquetImages], report: Report) -> List[EvalItem]:
    """The questions whose image file is there (a parquet suite's images are inside its files)."""
    kept, missing = (items, []) if images is not None else drop_missing_images(items)
    for image in missing:
        skip(report, "missing_images", image)
    report["kept"] = len(kept)
    return kept


def _print_question_set(name: str, q_lang: str, report: Report) -> None:
    """Which published table the question set read makes this suite comparable with."""
    if name == "test_slake":
        print(f"SLAKE: q_lang={q_lang}: {QUESTION_SETS[(name, q_lang)]}", flush=True)
    elif name == "test_pmcvqa":
        peer = ("the set MedEvalKit's table scores" if report.get("file") == "test_2.csv" else
                "not the set MedEvalKit's table scores (test_2.csv); compare with tables that name this file")
        print(f"PMC-VQA: questions from {report.get('file')}: {peer}", flush=True)


def _print_skipped(title: str, report: Report) -> None:
    counts = {k: report[k] for k in ("malformed", "empty_answers", "missing_images", "other_language", "without_answer")
              if report.get(k)}
    line = f"{title}: {report['records']} records, {report['kept']} questions kept"
    if counts:
        line += f"; skipped: {counts}, e.g. {report['skipped_examples'][:3]}"
    print(line, flush=True)


# ---- The scores of a raw file


def score_benchmark(engine, raw_path: str | Path, *, scoring: str = "letter", progress: bool = True,
                    image_loader: Optional[Callable[[str], torch.Tensor]] = None, judge=None,
                    judge_concurrency: int = 4) -> Dict[str, Any]:
    """Score a raw benchmark file: choice rows get a letter (``scoring``: letter mapping or
    log-likelihood, resumable through ``{raw}-scored.partial.csv``), every row its scores
    under medcap's rules and each peer's, and with a ``judge`` (``_llm_judge.JudgeClient``)
    the judge's verdict on the rows MedEvalKit judges (kept in ``{raw}-judge.jsonl``);
    writes ``{raw}-{np.round(overall, 4)}.csv``. Returns the summary's scores."""
    if scoring not in SCORING_METHODS:
        raise ValueError(f"vqa_scoring must be one of {list(SCORING_METHODS)}, got {scoring!r}")
    raw_path = Path(raw_path)
    suite = raw_path.name.split("-", 1)[0]  # the file's prefix: slake, pathvqa, ...
    rows = read_csv_rows(raw_path)
    letters = iter(_choice_letters(engine, raw_path, rows, scoring, progress, image_loader))
    judged = _judged(judge, rows, suite, raw_path, progress, judge_concurrency)
    scored = []
    for r, verdict in zip(rows, judged):
        row = dict(r)
        got = next(letters) if _is_choice(r) else {}
        row.update({c: got.get(c, "") for c in CHOICE_COLUMNS})
        s = row_scores(row)
        row.update({c: ("" if s is None else s[c]) for c in ROW_SCORE_COLUMNS})
        row.update(row_cells(row, suite))
        row.update(dict(zip(JUDGE_COLUMNS, verdict or ("", ""))))
        scored.append(row)
    scores = summarize(scored)
    conventions = {"medcap": {"overall": scores[HEADLINE]}, **headlines(scored, suite, judged=judge is not None)}
    columns = (list(rows[0]) if rows else []) + list(SCORED_COLUMNS)
    overall = scores[HEADLINE]
    for old in raw_path.parent.glob(f"{raw_path.stem}-*.csv"):
        if _is_scoring_of(old, raw_path):
            old.unlink()  # an earlier scoring of the same rows: one scored file per raw file
    scored_path = raw_path.with_name(f"{raw_path.stem}-{accuracy_name(overall if overall is not None else float('nan'))}.csv")
    write_csv_atomic(scored_path, columns, scored, bom=True)
    return {"scored_path": str(scored_path), "convention": CONVENTION, "headline": HEADLINE, "scores": scores,
            "conventions": conventions,
            "judge": "off" if judge is None else {"endpoint": judge.endpoint, "model": judge.model}}


def _judged(judge, rows, suite: str, raw_path: Path, progress: bool, concurrency: int) -> List[Optional[tuple]]:
    if judge is None:
        return [None] * len(rows)
    from medcap.eval._llm_judge import judge_rows

    return judge_rows(judge, rows, suite, raw_path.with_name(f"{raw_path.stem}-judge.jsonl"), progress=progress,
                      concurrency=concurrency)


def _is_choice(row: Dict[str, str]) -> bool:
    return row.get("answer_type") == "choice" and row.get("output", "") != ""


def _choice_letters(engine, raw_path: Path, rows: List[Dict[str, str]], scoring: str, progress: bool,
                    image_loader: Optional[Callable[[str], torch.Tensor]]) -> List[Dict[str, str]]:
    """The choice rows scored (``_choices``), in order; their partial file removed once done."""
    choice = [r for r in rows if _is_choice(r)]
    if not choice:
        return []
    journal = open_scoring(raw_path.with_name(f"{raw_path.stem}-scored.partial.csv"), choice, raw_path,
                           compare=("generated",))
    score_choices(engine, choice, journal, scoring, progress=progress, image_loader=image_loader,
                  questions={r.get("question_id", ""): r.get("question", "") for r in choice})
    journal.path.unlink()
    return journal.rows()


def _is_scoring_of(path: Path, raw_path: Path) -> bool:
    """``{raw}-{acc}.csv`` holding scored rows (not the raw file of a checkpoint named ``{ckpt}-2``)."""
    if not re.fullmatch(re.escape(raw_path.stem) + r"-(\d+(\.\d+)?(e-?\d+)?|nan)\.csv", path.name):
        return False
    with open(path, encoding="utf-8-sig") as fh:
        return "token_recall" in fh.readline()
