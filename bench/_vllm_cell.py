"""vLLM in the evaluation benchmark's cells, through medcap's vLLM backend (``VllmEngine``,
``backend=vllm``): the same model folder, the same prompt embeddings, greedy.

* ``start_vllm``: one vLLM server per model, for the whole run (its start takes 45-120 s
  on this CPU): ``--max-num-seqs`` the largest batch; a cell's batch is the number of
  requests in flight (``client.concurrency``), so vLLM decodes at most that many rows
  together. The engine holds a copy of the model's embedding side (``VllmEngine.start``
  drops the decoder's layers of the model it is given; ours keeps running on the
  original). With ``--threads 1`` (the CPU default) vLLM's OpenMP runs one thread
  (``VLLM_CPU_OMP_THREADS_BIND=0``), as our engine and the HF peers do.
* ``vllm_python``: the interpreter that has vLLM (``--vllm-python``, ``$MEDCAP_VLLM_PYTHON``
  or ``.venv-vllm/bin/python``), or why the column is not run.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Tuple

from _common import REPO_ROOT, log


def vllm_python(given: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(interpreter, "") when vLLM can run, else (None, why not)."""
    env = os.environ.get("MEDCAP_VLLM_PYTHON")
    cands = [given] if given else [env] if env else [str(REPO_ROOT / ".venv-vllm" / "bin" / "python")]
    for c in cands:
        if c and Path(c).is_file():
            return c, ""
    return None, "not run: no .venv-vllm with vLLM's CPU build here (make vllm; or --vllm-python)"


def start_vllm(model, tokenizer, hf_folder: Path, python: str, *, max_batch: int, threads: int, max_model_len: int):
    """A ``VllmEngine`` whose server decodes up to ``max_batch`` rows; (engine, seconds, why)."""
    import time

    from medcap.generation import VllmEngine, VllmError

    env = {"VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else "auto"}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})  # the server inherits it
    t = time.perf_counter()
    try:
        engine = VllmEngine.start(copy.deepcopy(model), tokenizer, str(hf_folder), python=python, dtype="fp32",
                                  batch_size=max_batch, max_model_len=max_model_len)
    except VllmError as e:
        log(f"vLLM not run: {e}")
        return None, 0.0, f"not run: {e}"
    seconds = time.perf_counter() - t
    log(f"vLLM server ready in {seconds:.0f} s")
    return engine, seconds, ""


def set_batch(engine, batch: int, chunk: int) -> None:
    """Rows in flight at once: the cell's batch size."""
    engine.batch_size = batch
    engine.chunk_size = chunk
    engine.client.concurrency = batch
