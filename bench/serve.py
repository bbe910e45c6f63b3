"""Load test of ``medcap serve``: K concurrent clients over loopback against one server,
and against the server a user would write without medcap.

Starts ``medcap serve`` (the tiny test model by default, or ``--demo DIR``), sends the
same bounded set of distinct requests (images x questions, greedy) with K = 1, 4, 16, 32,
64 concurrent clients (the curve: requests/s, tokens/s, p50/p99 latency, errors), then
the same requests to the baseline (``_hf_server.py``: the same model, one request at a
time through transformers' ``generate``, the same HTTP interface) at ``--baseline-clients``.
Prints one JSON line: the curves, whether every answer equals the sequential one and the
baseline's, and the goal (at 32 clients, >= 4x the baseline's requests/s). 127.0.0.1
only; bounded by ``--requests`` per K and ``--time-limit``.

    python bench/serve.py                       # tiny model, 64 requests per K
    python bench/serve.py --demo DIR            # the demo's trained model (medcap demo --out DIR)
    python bench/serve.py --quick               # checks the script runs; figures mean little
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUESTIONS = [None, "What is shown?", "Is there an abnormality?", "Which organ is this?"]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", metavar="DIR", help="serve the demo's trained model (default: the tiny test model)")
    p.add_argument("--clients", default="1,4,16,32,64", help="concurrent clients to try (default 1,4,16,32,64)")
    p.add_argument("--baseline-clients", default="1,32",
                   help="clients against the one-at-a-time transformers server (default 1,32; 0: not run)")
    p.add_argument("--requests", type=int, default=64, help="requests per K (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="the server's --batch-size (default 32)")
    p.add_argument("--max-context", type=int, default=128,
                   help="the server's --max-context (default 128: these prompts + max_tokens fit)")
    p.add_argument("--time-limit", type=float, default=600, help="give up after this many seconds (default 600)")
    p.add_argument("--quick", action="store_true", help="8 requests, K = 1, 4")
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.clients, a.baseline_clients = 8, "1,4", "4"
    a.clients = [int(k) for k in a.clients.split(",")]
    a.baseline_clients = [int(k) for k in a.baseline_clients.split(",") if int(k) > 0]
    if a.clients[0] != 1:
        a.clients.insert(0, 1)
    return a


def _server_command(args, work: Path) -> Tuple[List[str], List[Path], List[str]]:
    """The serve command line, the images to ask about and the baseline's command line."""
    hf = [sys.executable, str(REPO_ROOT / "bench" / "_hf_server.py")]
    base = [sys.executable, "-m", "medcap.cli", "serve", "--port", "0", "--no-page",
            "--batch-size", str(args.batch_size), "--max-context", str(args.max_context), "--queue-size", "1024"]
    if args.demo:
        world = Path(args.demo) / "world"
        recs = json.loads((world / "test.json").read_text(encoding="utf-8"))
        # A record's image is relative to its `meta` dir=, itself relative to the JSON's folder.
        dirs = [dict(kv.split("=", 1) for kv in r.get("meta", "").split(";") if "=" in kv).get("dir", ".") for r in recs[:8]]
        images = [world / d / r["image"] for d, r in zip(dirs, recs[:8])]
        ckpt = Path(args.demo) / "train" / "checkpoint" / "meta_model_last.safetensors"
        return (base + ["--demo", args.demo], images,
                hf + [str(ckpt), f"demo_dir={args.demo}", "--config", "demo/generate"])
    import torch

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.testing import make_tiny_training_assets

    assets = make_tiny_training_assets(work / "tiny", samples=8)
    torch.manual_seed(0)  # a fixed vision side: the same answers on every run
    ckpt = work / "tiny" / "vision.pt"
    save_vision_checkpoint(medcap_tiny(**assets["model_kwargs"], num_image_tokens=4), ckpt)
    images = sorted((work / "tiny" / "data" / "images").glob("*.png"))
    over = [f"assets_dir={assets['assets_dir']}"]
    return (base + ["--config", "tiny/generate", *over, f"vision_checkpoint={ckpt}"], images,
            hf + [str(ckpt), *over, "--config", "tiny/generate"])


def _start(cmd: List[str], timeout: float) -> Tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+?)/? ", line)
        if m:
            url = m.group(1).rstrip("/")
            while time.monotonic() < deadline:  # the app is up once /health answers
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=5).read()
                    return proc, url
                except OSError:
                    time.sleep(0.1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


def _bodies(images: List[Path], n: int, max_tokens: int) -> List[bytes]:
    urls = [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in images]
    out = []
    for i in range(n):
        q = QUESTIONS[(i // len(urls)) % len(QUESTIONS)]
        parts = [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}}]
        if q:
            parts.append({"type": "text", "text": q})
        out.append(json.dumps({"model": "medcap", "messages": [{"role": "user", "content": parts}],
                               "max_tokens": max_tokens, "temperature": 0}).encode())
    return out


def _run(url: str, bodies: List[bytes], k: int) -> Dict[str, Any]:
    import http.client
    import threading
    from urllib.parse import urlsplit

    host = urlsplit(url)
    local = threading.local()  # one kept-alive connection per concurrent user, as API clients hold one
    headers = {"Content-Type": "application/json"}

    def one(body: bytes):
        # the standard library's client: the load generator shares the CPUs with the server,
        # so it must cost little per request
        t0 = time.perf_counter()
        try:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection(host.hostname, host.port, timeout=300)
            local.conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            r = local.conn.getresponse()
            raw = r.read()
            ok = r.status == 200
            js = json.loads(raw) if ok else {}
            text = js["choices"][0]["message"]["content"] if ok else None
            toks = js["usage"]["completion_tokens"] if ok else 0
        except Exception as e:  # noqa: BLE001 - counted as an error
            print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
            ok, text, toks = False, None, 0
            local.__dict__.pop("conn", None)
        return ok, text, toks, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        res = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    lat = sorted(r[3] for r in res)
    return {
        "clients": k, "requests": len(bodies), "wall_s": round(wall, 3),
        "req_per_s": round(len(bodies) / wall, 2), "tok_per_s": round(sum(r[2] for r in res) / wall, 1),
        "p50_s": round(statistics.median(lat), 4), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
        "errors": sum(not r[0] for r in res), "_texts": [r[1] for r in res],
    }


def settings(args) -> Dict[str, Any]:
    """What the figures depend on (the docs test compares them with ``make bench``'s)."""
    return {"model": "demo" if args.demo else "tiny", "clients": args.clients,
            "baseline_clients": args.baseline_clients, "requests": args.requests, "max_tokens": args.max_tokens,
            "batch_size": args.batch_size, "max_context": args.max_context, "greedy": True, "host": "127.0.0.1"}


def _curve(cmd: List[str], bodies: List[bytes], clients: List[int], deadline: float, what: str) -> List[Dict]:
    """One server started, warmed up, loaded at each K in turn, stopped."""
    proc, url = _start(cmd, timeout=max(30.0, min(300.0, deadline - time.monotonic())))
    runs = []
    try:
        _run(url, bodies[:2], 2)  # warm-up: first allocations, first prefill
        for k in clients:
            if time.monotonic() > deadline:
                print(f"{what}: time limit reached before K={k}", file=sys.stderr)
                break
            runs.append(_run(url, bodies, k))
            print(f"{what} K={k}: {runs[-1]['req_per_s']} req/s, p99 {runs[-1]['p99_s']} s, "
                  f"{runs[-1]['errors']} errors", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return runs


def _goal(runs: List[Dict], base: List[Dict], k: int = 32) -> Dict[str, Any]:
    ours = next((r for r in runs if r["clients"] == k), None)
    theirs = next((r for r in base if r["clients"] == k), None)
    value = round(ours["req_per_s"] / theirs["req_per_s"], 2) if ours and theirs else None
    same = ours is not None and theirs is not None and ours["_texts"] == theirs["_texts"]
    return {"goal": "serve_vs_hf_one_at_a_time", "clients": k, "value": value, "target": 4.0,
            "met": None if value is None else (value >= 4.0 and same), "answers_identical": same,
            "what": f"requests/s at {k} clients, medcap serve over the one-request-at-a-time transformers server"}


def main(argv: Optional[List[str]] = None) -> int:
    args = _args(argv)
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory() as tmp:
        cmd, images, hf_cmd = _server_command(args, Path(tmp))
        bodies = _bodies(images, args.requests, args.max_tokens)
        runs = _curve(cmd, bodies, args.clients, deadline, "medcap serve")
        base = _curve(hf_cmd, bodies, args.baseline_clients, deadline, "transformers, one at a time") \
            if args.baseline_clients else []
    seq = runs[0]
    for r in runs + base:
        r["speedup_req"] = round(r["req_per_s"] / seq["req_per_s"], 2)
        r["identical_to_sequential"] = r["_texts"] == seq["_texts"]
    goal = _goal(runs, base, 32 if not args.quick else base[-1]["clients"] if base else 32)
    out = {
        "bench": "serve", "model": "demo" if args.demo else "tiny", "cpus": os.cpu_count(),
        "settings": settings(args),
        "runs": [{k: v for k, v in r.items() if k != "_texts"} for r in runs],
        "baseline_runs": [{k: v for k, v in r.items() if k != "_texts"} for r in base],
        "errors": sum(r["errors"] for r in runs + base),
        "all_identical": all(r["identical_to_sequential"] for r in runs + base),
        "goals": [goal], "goals_met": goal["met"] is not False,
    }
    out["outputs_match"] = out["all_identical"]
    print(json.dumps(out))
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
