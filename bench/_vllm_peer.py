"""vLLM as a peer in the same run: its own offline engine (``vllm.LLM``, CPU build), fed our
prompt embeddings (text + image soft tokens), in a child process under vLLM's environment
(``.venv-vllm``, which pins its own torch; ``make vllm``).

* ``vllm_python``: the interpreter that has vLLM, or why there is none (the column then
  says "not run: ...");
* ``VllmPeerEngine``: ``GenerationEngine``'s interface; ``load(folder, batch)`` starts the
  child (once) and builds an ``LLM`` with ``max_num_seqs = batch``; ``generate_tokens``
  sends the embeddings (a ``torch.save`` file) and reads back the tokens;
* run as a script (``python _vllm_peer.py``, by the child): reads one JSON command per
  stdin line (``load``, ``run``, ``quit``) and answers one line starting with ``REPLY``.
  vLLM binds its one OpenMP thread to a core (``VLLM_CPU_OMP_THREADS_BIND``), as our
  benches run one torch thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

REPLY = "@@vllm-peer@@ "
REPO = Path(__file__).resolve().parent.parent


def vllm_python(given: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(interpreter, "") when vLLM can run, else (None, why not)."""
    cands = [given] if given else [os.environ.get("MEDCAP_VLLM_PYTHON"), str(REPO / ".venv-vllm" / "bin" / "python")]
    for c in cands:
        if c and Path(c).is_file():
            return c, ""
    return None, "not run: no .venv-vllm with vLLM's CPU build here (make vllm, issue #26; or --vllm-python)"


# ---- the client, in medcap's environment


class VllmPeerEngine:
    """vLLM's engine behind ``generate_tokens``; prompts, images and scoring are the wrapped
    ``GenerationEngine``'s (``base``), so vLLM sees exactly our embeddings."""

    def __init__(self, base, python: str, folder: Path):
        self.base, self.python, self.folder = base, python, folder
        self.proc: Optional[subprocess.Popen] = None
        self.batch: Optional[int] = None
        self.last_stats = {}

    def __getattr__(self, name):
        return getattr(self.base, name)

    def _ask(self, cmd: dict, timeout: float = 1800) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                rep = json.loads(line[len(REPLY):])
                if "error" in rep:
                    raise RuntimeError(f"vLLM peer: {rep['error']}")
                return rep
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"vLLM peer: no answer to {cmd.get('cmd')} (see its log {self.log})")

    def load(self, batch: int, max_model_len: int) -> float:
        """A vLLM engine with ``batch`` sequences at most; returns its start seconds."""
        if self.proc is None:
            self.log = Path(tempfile.mkstemp(prefix="medcap-vllm-peer-", suffix=".log")[1])
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                   "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
            self.proc = subprocess.Popen([self.python, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=open(self.log, "w"), text=True, env=env, cwd=REPO)
        if self.batch == batch:
            return 0.0
        rep = self._ask({"cmd": "load", "model": str(self.folder), "max_num_seqs": batch,
                         "max_model_len": max_model_len})
        self.batch = batch
        return rep["seconds"]

    def generate_tokens(self, prompts, images, max_new_tokens, keys) -> List[List[int]]:
        import torch

        budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        with torch.inference_mode():
            embeds = [self.base.model.embed(torch.tensor([list(p)], device=self.base.device),
                                            None if im is None else im[None].to(self.base.device))[0].cpu()
                      for p, im in zip(prompts, images)]  # [s, d] each
        fd, path = tempfile.mkstemp(prefix="medcap-vllm-embeds-", suffix=".pt")
        os.close(fd)
        try:
            torch.save(embeds, path)
            rep = self._ask({"cmd": "run", "embeds": path, "budgets": budgets,
                             "stop": list(self.base.tokenizer.stop_tokens)})
        finally:
            os.unlink(path)
        stop = set(self.base.tokenizer.stop_tokens)
        return [next((t[:i] for i, x in enumerate(t) if x in stop), t) for t in rep["tokens"]]

    def close(self) -> None:
        if self.proc is not None:
            try:
                self._ask({"cmd": "quit"}, timeout=60)
            except (RuntimeError, OSError, ValueError):
                pass
            self.proc.wait(timeout=120)
            self.proc = None


# ---- the child, in vLLM's environment


def _serve() -> None:
    import gc

    import torch
    from vllm import LLM, SamplingParams

    llm = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                print(REPLY + "{}", flush=True)
                return
            if cmd["cmd"] == "load":
                t = time.perf_counter()
                del llm
                gc.collect()
                llm = LLM(model=cmd["model"], enable_prompt_embeds=True, skip_tokenizer_init=True, dtype="float32",
                          max_num_seqs=cmd["max_num_seqs"], max_model_len=cmd["max_model_len"], seed=0,
                          gpu_memory_utilization=0.15)
                print(REPLY + json.dumps({"seconds": time.perf_counter() - t}), flush=True)
            elif cmd["cmd"] == "run":
                embeds = torch.load(cmd["embeds"])
                params = [SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=cmd["stop"], detokenize=False)
                          for m in cmd["budgets"]]
                t = time.perf_counter()
                res = llm.generate([{"prompt_embeds": e} for e in embeds], params, use_tqdm=False)
                toks = [list(r.outputs[0].token_ids) for r in res]
                print(REPLY + json.dumps({"tokens": toks, "seconds": time.perf_counter() - t}), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the client as one line
            print(REPLY + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    _serve()
