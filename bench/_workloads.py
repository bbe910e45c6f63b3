"""Where the benchmarks' rows stop: the two workloads every generation figure names.

* ``measured``: the trained demo model's own outputs on its held-out set, per kind of
  generation (``desc``: OmniMedVQA's image descriptions, ``answer``: its answers,
  ``score``: the letter replies, ``caption``: the captioning suite), as token counts in
  ``bench/workloads/demo_stop_lengths.json`` (remade by ``python bench/demo_stop_lengths.py
  DEMO_DIR``). A row's stop length is drawn for its key from its kind's counts, the same
  for every engine and every batch the row lands in.
* ``budget``: every row runs to its budget, the stated worst case.

Random weights never stop on their own, so a row's budget is cut to its drawn length
(``StopAtLengths``); a length counts the stop token a trained model samples last, so the
work (prefill, decode passes) is the trained model's.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

WORKLOADS = ("measured", "budget")
STOP_LENGTHS_FILE = Path(__file__).resolve().parent / "workloads" / "demo_stop_lengths.json"


def load_stop_lengths(path: Path = STOP_LENGTHS_FILE) -> Dict[str, Any]:
    """The committed measured lengths (see ``demo_stop_lengths.py``)."""
    if not path.is_file():
        raise SystemExit(f"bench: error: {path} is missing; make it with: python bench/demo_stop_lengths.py DEMO_DIR")
    return json.loads(path.read_text(encoding="utf-8"))


def _sorted_counts(hist: Dict[str, int]) -> List[int]:
    return [int(n) for n, c in sorted(((int(k), v) for k, v in hist.items())) for _ in range(int(c))]


class StopLengths:
    """``length(key)``: the stop length of row ``key`` (its kind is the key's prefix; other
    prefixes take ``desc``), a quantile of the kind's measured counts picked by a hash of
    the key and the seed."""

    def __init__(self, data: Dict[str, Any], seed: int = 0):
        self.seed = seed
        self.values = {kind: _sorted_counts(spec["steps"]) for kind, spec in data["kinds"].items()}

    def length(self, key: str) -> int:
        kind = key.split(":", 1)[0]
        values = self.values.get(kind, self.values["desc"])
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:8], "little")
        return values[h % len(values)]

    def means(self) -> Dict[str, float]:
        return {k: round(sum(v) / len(v), 2) for k, v in self.values.items()}


class StopAtLengths:
    """An engine whose rows stop at their drawn length (``lengths``), or at their budget
    (``lengths=None``, the budget workload). Counts the wrapped engine's work and the time
    spent generating, so one evaluation run gives both generation and end-to-end figures."""

    def __init__(self, engine, lengths: "StopLengths | None"):
        self.engine, self.lengths = engine, lengths
        self.reset()

    def reset(self) -> None:
        self.stats: Dict[str, int] = {}  # the engine's work counts summed over calls
        self.generate_s = 0.0  # seconds inside generate_texts
        self.rows = self.tokens = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def budgets(self, max_new_tokens, keys: Sequence[str]) -> List[int]:
        per_row = [max_new_tokens] * len(keys) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if self.lengths is None:
            return [int(m) for m in per_row]
        return [min(int(m), self.lengths.length(k)) for m, k in zip(per_row, keys)]

    def generate_texts(self, prompts, images, max_new_tokens, keys) -> List[str]:
        budgets = self.budgets(max_new_tokens, keys)
        t = time.perf_counter()
        tokens = self.engine.generate_tokens(prompts, images, budgets, keys)
        self.generate_s += time.perf_counter() - t
        self.rows += len(tokens)
        self.tokens += sum(len(x) for x in tokens)
        for k, v in getattr(self.engine, "last_stats", {}).items():
            self.stats[k] = self.stats.get(k, 0) + v
        from medcap.generation import decode_text

        return [decode_text(self.engine.tokenizer, x) for x in tokens]
