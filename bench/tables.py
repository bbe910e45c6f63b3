"""The docs' benchmark tables, made from the committed JSON (``bench/results/*.json``).

    python bench/tables.py            # rewrite the blocks between the markers
    python bench/tables.py --check    # exit 1 when a block differs from what the JSON gives

Blocks (each between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``):

* ``bench-figures`` (README.md): the goals, met or missed, and the headline cells;
* ``bench-serve`` (README.md): the serving curve against the one-at-a-time server;
* ``bench-results`` (bench/README.md): every cell of every benchmark.

Every figure names its workload (``measured``: where the trained demo model stopped;
``budget``: every row to its budget). ``make bench`` runs the benchmarks, then this.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCHES = ("eval_omnimedvqa", "train_step", "serve")
ENGINE_NAMES = {"ours": "medcap (continuous)", "static": "medcap (static)", "hf_static": "HF `generate` (static)",
                "hf_cb": "transformers CB", "vllm": "vLLM backend", "reference": "reference's algorithm"}
MADE_BY = "Made by `make bench` from `bench/results/*.json` (`python bench/tables.py`); do not edit by hand."


def load_results(folder: Path = RESULTS) -> Dict[str, Dict]:
    return {b: json.loads((folder / f"{b}.json").read_text(encoding="utf-8"))
            for b in BENCHES if (folder / f"{b}.json").is_file()}


def _x(v: Optional[float]) -> str:
    return "not measured" if v is None else f"{v:.2f}x"


def _met(m) -> str:
    return "n/a" if m is None else ("yes" if m else "**no**")


def _machine(r: Dict) -> str:
    m = r.get("machine", {})
    return (f"{m.get('cpu_count', '?')} CPU cores, {m.get('torch_threads', '?')} torch thread(s), torch "
            f"{m.get('torch', '?')}, load average {m.get('loadavg_1min', '?')} at the end")


# ---- the goals


def goal_rows(res: Dict[str, Dict]) -> List[str]:
    rows = ["| goal | model | workload | batch / clients | measured | target | met |", "|---|---|---|---|---|---|---|"]
    for g in res.get("eval_omnimedvqa", {}).get("goals", []):
        rows.append(f"| {g['what']} | {g['model']} | {g['workload']} | {g['batch']} | {_x(g['value'])} | "
                    f">= {g['target']:g}x | {_met(g['met'])} |")
    for g in res.get("serve", {}).get("goals", []):
        same = "" if g["answers_identical"] else " (answers differ)"
        rows.append(f"| {g['what']}{same} | {res['serve']['settings']['model']} | serving | {g['clients']} | "
                    f"{_x(g['value'])} | >= {g['target']:g}x | {_met(g['met'])} |")
    tr = res.get("train_step")
    if tr:
        for k, target in tr["goals"].items():
            if k in tr["ratios"]:
                rows.append(f"| training: {k.replace('_', ' ')} (shipped configs' settings) | bench | training | "
                            f"{tr['settings']['batch']} | {_x(tr['ratios'][k])} | >= {target:g}x | "
                            f"{_met(tr['goals_met'].get(k))} |")
    return rows


# ---- evaluation cells


def _sorted_cells(r: Dict) -> List[Dict]:
    """By model, workload and batch (the bench runs the goals' cells first)."""
    models, loads = list(r["settings"]["models"]), list(r["settings"]["workloads"])
    return sorted(r["cells"], key=lambda c: (models.index(c["model"]), loads.index(c["workload"]), c["batch"]))


def eval_rows(r: Dict, batches: Optional[List[int]] = None) -> List[str]:
    engines = [e for e in r["settings"]["engines"] if e != "reference"]
    rows = ["| model | workload | batch | " + " | ".join(ENGINE_NAMES[e] for e in engines) + " | answers |",
            "|---|---|---|" + "---|" * len(engines) + "---|"]
    for c in _sorted_cells(r):
        if batches and c["batch"] not in batches:
            continue
        cells = []
        for e in engines:
            f = c["figures"].get(e)
            cells.append(c["not_run"].get(e, "not run").split(":")[0] if f is None else
                         f"{f['questions_per_s']:.2f} q/s, {f['generation_tokens_per_s']:.0f} tok/s")
        bad = [ENGINE_NAMES[e] for e, ok in c["outputs_match"].items() if not ok]
        rows.append(f"| {c['model']} | {c['workload']} | {c['batch']} | " + " | ".join(cells) + " | "
                    + ("identical" if not bad else "differ: " + ", ".join(bad)) + " |")
    return rows


def reference_rows(r: Dict) -> List[str]:
    rows = ["| model | workload | questions | reference's algorithm | answers equal ours |", "|---|---|---|---|---|"]
    for m, per in r.get("reference", {}).items():
        for w, f in per.items():
            rows.append(f"| {m} | {w} | {f['questions']} | {f['questions_per_s']:.3f} q/s, "
                        f"{f['generation_tokens_per_s']:.0f} tok/s | {_met(f['outputs_match'])} |")
    return rows


def passes_rows(r: Dict) -> List[str]:
    rows = ["| model | workload | batch | decode passes, static / continuous | wall, continuous over static |",
            "|---|---|---|---|---|"]
    for c in _sorted_cells(r):
        o, s = c["figures"].get("ours", {}), c["figures"].get("static", {})
        if o.get("decode_passes") and s.get("decode_passes"):
            rows.append(f"| {c['model']} | {c['workload']} | {c['batch']} | {s['decode_passes']} / "
                        f"{o['decode_passes']} = {s['decode_passes'] / o['decode_passes']:.2f}x | "
                        f"{o['questions_per_s'] / s['questions_per_s']:.2f}x |")
    return rows


# ---- training and serving


def train_rows(r: Dict) -> List[str]:
    ref = r["figures"]["reference"]["samples_per_s"]
    what = {"reference": "reference's way (random batches, logits everywhere)",
            "ours": "medcap, shipped configs (group_by_length off)", "ours_grouped": "medcap, group_by_length on"}
    rows = ["| way | samples/s | vs reference | peak memory above start |", "|---|---|---|---|"]
    for k, f in r["figures"].items():
        rows.append(f"| {what.get(k, k)} | {f['samples_per_s']:.2f} | {f['samples_per_s'] / ref:.2f}x | "
                    f"+{f['peak_memory_mib']} MiB |")
    return rows


def serve_rows(r: Dict) -> List[str]:
    rows = ["| server | clients | requests/s | tokens/s | p50 | p99 | errors | answers equal the sequential ones |",
            "|---|---|---|---|---|---|---|---|"]
    for name, runs in (("medcap serve", r["runs"]), ("transformers `generate`, one at a time", r["baseline_runs"])):
        for x in runs:
            rows.append(f"| {name} | {x['clients']} | {x['req_per_s']:.1f} | {x['tok_per_s']:.0f} | "
                        f"{x['p50_s'] * 1000:.0f} ms | {x['p99_s'] * 1000:.0f} ms | {x['errors']} | "
                        f"{_met(x['identical_to_sequential'])} |")
    return rows


# ---- the blocks


def _eval_intro(r: Dict) -> str:
    s = r["settings"]
    models = "; ".join(f"`{m}`: width {d['embed_dim']}, {d['num_layers']} layers, {d['num_heads']} heads on "
                       f"{d['num_kv_heads']} KV heads, vocabulary {d['vocab_size']}" for m, d in s["models"].items())
    means = s.get("measured_means", {})
    return (f"OmniMedVQA end to end (`python bench/eval_omnimedvqa.py`): {s['questions']} questions "
            f"({s['b1_questions']} at batch 1), random weights, fp32, {s['num_image_tokens']} image tokens; {models}. "
            f"Workloads: `measured`, rows stop where the trained demo model stopped on its held-out set "
            f"(`bench/workloads/demo_stop_lengths.json`, mean steps: descriptions {means.get('desc', '?')}, answers "
            f"{means.get('answer', '?')}, letter replies {means.get('score', '?')}); `budget`, every row runs to its "
            f"budget (description {s['max_new_tokens']}, answer {s['answer_max_new_tokens']}, letter reply "
            f"{s['letter_max_new_tokens']}), the worst case. Figures: questions/s of the whole suite (files "
            f"included), and generation tokens/s over the time spent inside the engine; median of {s['reps']} "
            f"interleaved runs at batch 16, {s.get('side_reps', s['reps'])} at the other batch sizes. {_machine(r)}.")


def block_figures(res: Dict[str, Dict]) -> str:
    out = [MADE_BY, "", *goal_rows(res), ""]
    r = res.get("eval_omnimedvqa")
    if r:
        out += [_eval_intro(r), "", *eval_rows(r, [16]), "",
                "Every batch size, the reference's algorithm, decode passes and training: "
                "[bench/README.md](bench/README.md#results)."]
    return "\n".join(out)


def block_serve(res: Dict[str, Dict]) -> str:
    r = res.get("serve")
    if not r:
        return MADE_BY + "\n\nNo serving figures yet: `make bench`."
    s = r["settings"]
    return "\n".join([MADE_BY, "", f"`python bench/serve.py --demo DIR`: the {s['model']} model, {s['requests']} "
                      f"greedy requests per client count (`max_tokens` {s['max_tokens']}), keep-alive clients on "
                      f"127.0.0.1, the server's `--batch-size` {s['batch_size']}; the baseline is the same model "
                      "behind the same HTTP interface, one request at a time through transformers' `generate` "
                      f"(`bench/_hf_server.py`). {r['cpus']} CPU cores.", "", *serve_rows(r)])


def block_results(res: Dict[str, Dict]) -> str:
    out = [MADE_BY, "", "### Goals", "", *goal_rows(res)]
    r = res.get("eval_omnimedvqa")
    if r:
        out += ["", "### OmniMedVQA end to end, every cell", "", _eval_intro(r), "", *eval_rows(r), "",
                "Continuous against static batching (the same engine and steps, `continuous=False`):", "",
                *passes_rows(r), "", "The reference's algorithm (one question at a time, no cache) on the first "
                f"{r['settings']['ref_limit']} questions:", "", *reference_rows(r)]
        if r.get("not_run"):
            out += ["", "Cells not run (the time limit): " + ", ".join(r["not_run"]) + "."]
    t = res.get("train_step")
    if t:
        s = t["settings"]
        out += ["", "### Training step", "", f"`python bench/train_step.py`: the vision side trained with the LLM "
                f"frozen, {s['samples_per_epoch']} samples per epoch, batch {s['batch']}, activation checkpointing "
                f"{'on' if s['activation_checkpointing'] else 'off'}, loss chunks of {s['loss_chunk']}, caption "
                f"lengths log-normal (median {s['caption_tokens']['median']:g} tokens); {_machine(t)}.", "",
                *train_rows(t)]
    if res.get("serve"):
        out += ["", "### Serving", "", block_serve(res).split("\n", 2)[2]]
    return "\n".join(out)


BLOCKS = {"bench-figures": (REPO / "README.md", block_figures), "bench-serve": (REPO / "README.md", block_serve),
          "bench-results": (REPO / "bench" / "README.md", block_results)}


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"tables.py: error: the markers {begin} / {end} must occur once each")
    head, rest = text.split(begin)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def current_block(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"\n<!-- {name}:end -->", 1)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a block differs from the JSON's")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    res, stale = load_results(args.results), []
    for name, (path, make) in BLOCKS.items():
        text, body = path.read_text(encoding="utf-8"), make(res)
        if current_block(text, name) != body:
            stale.append(f"{path.relative_to(REPO)}: {name}")
            if not args.check:
                path.write_text(replace_block(text, name, body), encoding="utf-8")
    if args.check and stale:
        print("tables.py: these blocks differ from bench/results/*.json: " + "; ".join(stale), file=sys.stderr)
        return 1
    print(("rewritten: " + "; ".join(stale)) if stale else "every block matches bench/results/*.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
