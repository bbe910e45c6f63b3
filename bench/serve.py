"""Load test of ``medcap serve``: K concurrent clients over loopback against one server.

Starts ``medcap serve`` (the tiny test model by default, or ``--demo DIR``), sends the
same bounded set of distinct requests (images x questions, greedy) with K = 1, 8, 32
concurrent clients, and prints one JSON line: requests/s and tokens/s for each K and
against K = 1 (sequential single requests), p50/p99 latency, errors (must be 0) and
whether every answer equals its sequential answer.

    python bench/serve.py                       # tiny model, 64 requests per K
    python bench/serve.py --demo datasets/demo  # the demo's trained model
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
    p.add_argument("--clients", default="1,8,32", help="concurrent clients to try (default 1,8,32; 1 is the baseline)")
    p.add_argument("--requests", type=int, default=64, help="requests per K (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="the server's --batch-size (default 32)")
    p.add_argument("--max-context", type=int, default=128,
                   help="the server's --max-context (default 128: these prompts + max_tokens fit)")
    p.add_argument("--time-limit", type=float, default=600, help="give up after this many seconds (default 600)")
    p.add_argument("--quick", action="store_true", help="8 requests, K = 1, 4")
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.clients = 8, "1,4"
    a.clients = [int(k) for k in a.clients.split(",")]
    if a.clients[0] != 1:
        a.clients.insert(0, 1)
    return a


def _server_command(args, work: Path) -> Tuple[List[str], List[Path]]:
    """The serve command line and the images to ask about."""
    base = [sys.executable, "-m", "medcap.cli", "serve", "--port", "0", "--no-page",
            "--batch-size", str(args.batch_size), "--max-context", str(args.max_context), "--queue-size", "1024"]
    if args.demo:
        world = Path(args.demo) / "world"
        recs = json.loads((world / "test.json").read_text(encoding="utf-8"))
        # A record's image is relative to its `meta` dir=, itself relative to the JSON's folder.
        dirs = [dict(kv.split("=", 1) for kv in r.get("meta", "").split(";") if "=" in kv).get("dir", ".") for r in recs[:8]]
        images = [world / d / r["image"] for d, r in zip(dirs, recs[:8])]
        return base + ["--demo", args.demo], images
    import torch

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.testing import make_tiny_training_assets

    assets = make_tiny_training_assets(work / "tiny", samples=8)
    torch.manual_seed(0)  # a fixed vision side: the same answers on every run
    ckpt = work / "tiny" / "vision.pt"
    save_vision_checkpoint(medcap_tiny(**assets["model_kwargs"], num_image_tokens=4), ckpt)
    images = sorted((work / "tiny" / "data" / "images").glob("*.png"))
    return base + ["--config", "tiny/generate", f"assets_dir={assets['assets_dir']}", f"vision_checkpoint={ckpt}"], images


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


def main(argv: Optional[List[str]] = None) -> int:
    args = _args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd, images = _server_command(args, Path(tmp))
        proc, url = _start(cmd, timeout=min(300, args.time_limit))
        started = time.monotonic()
        try:
            bodies = _bodies(images, args.requests, args.max_tokens)
            _run(url, bodies[:2], 2)  # warm-up: first allocations, first prefill
            runs = []
            for k in args.clients:
                if time.monotonic() - started > args.time_limit:
                    print(f"time limit reached before K={k}", file=sys.stderr)
                    break
                runs.append(_run(url, bodies, k))
                print(f"K={k}: {runs[-1]['req_per_s']} req/s, {runs[-1]['errors']} errors", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    seq = runs[0]
    for r in runs:
        r["speedup_req"] = round(r["req_per_s"] / seq["req_per_s"], 2)
        r["speedup_tok"] = round(r["tok_per_s"] / seq["tok_per_s"], 2) if seq["tok_per_s"] else None
        r["identical_to_sequential"] = r["_texts"] == seq["_texts"]
    out = {
        "bench": "serve", "model": "demo" if args.demo else "tiny", "cpus": os.cpu_count(),
        "batch_size": args.batch_size, "max_context": args.max_context, "max_tokens": args.max_tokens,
        "runs": [{k: v for k, v in r.items() if k != "_texts"} for r in runs],
        "errors": sum(r["errors"] for r in runs),
        "all_identical": all(r["identical_to_sequential"] for r in runs),
    }
    print(json.dumps(out))
    return 0 if out["errors"] == 0 and out["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
