"""VQA-RAD (``test_vqarad``): its closed test questions, answered in two steps.

In this file, in the order of a run:

* the questions: ``{source}/VQA_RAD/VQA_RAD Dataset Public.json``, images in
  ``{source}/VQA_RAD/VQA_RAD Image Folder/``; those with ``phrase_type``
  test_freeform or test_para and ``answer_type`` CLOSED, in file order;
* ``VQARADSuite``: what ``recipes/generate.py`` calls, step by step: ``read``,
  ``make_rows`` (the two-step protocol, ``_protocol``), ``score``, ``report``;
  ``run_test_vqarad`` runs it whole. As in the reference, nothing is scored here:
  ``tools/judge.py`` (the LLM judge) scores the file.

File: ``vqarad-{vqa_type}-raw-{ckpt}.csv`` (image, instruction, output, generated;
UTF-8 with BOM).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from medcap.eval._protocol import TwoStepVQA, check_vqa_type
from medcap.eval._run import EvalItem, SuiteRun, read_question_list, ready_items, run_suite, text_of, unique_keys

VQARAD_PHRASE_TYPES = ("test_freeform", "test_para")

# ---- The questions


def read_vqarad(dataset_source: str | Path) -> Tuple[List[EvalItem], Dict[str, Any]]:
    """The closed test questions of VQA-RAD (``phrase_type`` test_freeform or test_para,
    ``answer_type`` CLOSED), in file order, and a report of what was read."""
    root = Path(dataset_source) / "VQA_RAD"
    path = root / "VQA_RAD Dataset Public.json"
    records = read_question_list(path, "VQA-RAD", dataset_source)
    img_dir = root / "VQA_RAD Image Folder"
    items: List[EvalItem] = []
    answer_types: Counter = Counter()
    malformed = 0
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(k in r for k in ("question", "image_name", "answer")):
            malformed += 1
            continue
        answer_types[text_of(r.get("answer_type"))] += 1
        if r.get("phrase_type") not in VQARAD_PHRASE_TYPES or r.get("answer_type") != "CLOSED":
            continue
        qid = text_of(r.get("qid")) or str(i)
        items.append(EvalItem(image=text_of(r["image_name"]), path=str(img_dir / text_of(r["image_name"])),
                              question=text_of(r["question"]), answer=text_of(r["answer"]), key=f"vqarad:{qid}"))
    unique_keys(items)
    report = {
        "source": str(path),
        "records": len(records),
        "kept": len(items),
        "malformed": malformed,
        "answer_types": dict(answer_types),
    }
    return items, report


# ---- The suite


class VQARADSuite:
    """``test_vqarad``: VQA-RAD's closed test questions, answered; the judge scores the file."""

    def __init__(self, run: SuiteRun, *, dataset_source: str, vqa_type: str, max_seq_len: int, max_new_tokens: int):
        check_vqa_type(vqa_type)
        self.run, self.dataset_source = run, dataset_source
        self.raw_path = run.results_path(f"vqarad-{vqa_type}-raw-{run.ckpt}.csv")
        self.protocol = TwoStepVQA(vqa_type, raw_path=self.raw_path, identity={**run.identity, "suite": "test_vqarad"},
                                   max_seq_len=max_seq_len, max_new_tokens=max_new_tokens, ranks=run.ranks)
        self.columns, self.identity, self.unit = self.protocol.columns, self.protocol.identity, self.protocol.unit
        self.data_report: Dict[str, Any] = {}

    def read(self) -> List[EvalItem]:
        """The questions whose image exists (the report saved beside the raw file), cut to ``run.limit``."""
        items, self.data_report = read_vqarad(self.dataset_source)
        return ready_items("VQA-RAD", items, self.data_report, self.raw_path, self.run)

    def make_rows(self, engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        """Each question asked in the protocol's two steps (``TwoStepVQA.make_rows``)."""
        return self.protocol.make_rows(engine, items, images)

    def score(self, engine, rows: Sequence[Dict[str, str]], left_out: Dict[str, str]) -> Dict[str, Any]:
        """Nothing to score here (the reference's judge, ``tools/judge.py``, reads the file)."""
        return {"raw_path": str(self.raw_path), "rows": len(rows), "report": self.data_report}

    def report(self, result: Dict[str, Any]) -> None:
        print(f"wrote {self.raw_path} ({result['rows']} rows); judge it with: "
              f"python tools/judge.py --exp eval_vqa --csv-path {self.raw_path}")


def run_test_vqarad(engine, run: SuiteRun, **settings) -> Dict[str, Any]:
    """Answer VQA-RAD's closed test questions: ``VQARADSuite(run, **settings)``, whole."""
    return run_suite(engine, VQARADSuite(run, **settings), run)
