"""An LLM judge for open answers over HTTP: any OpenAI-compatible chat endpoint (``medcap
serve``, a local vLLM, a hosted model), as the published tables that use a judge.

MedEvalKit's SLAKE, PathVQA and VQA-RAD numbers use an LLM judge (GPT-4.1) for open
questions (SLAKE's for every question). ``judge_endpoint=`` and ``judge_model=`` switch
the same on here: each such row's question, reference answer and reply go to the judge
with ``JUDGE_PROMPT`` (MedEvalKit's instruction in our own words: the same meaning, or
another reading of the reference, is correct; the verdict in ``<judge>0</judge>`` for
correct, ``1`` for wrong), and the verdict and the judge's reply are kept per row.

* ``JudgeClient``: the endpoint (the base URL the ``openai`` client takes, e.g.
  ``http://127.0.0.1:8000/v1``), plain ``urllib``, greedy, ``check()`` before any work,
  a busy or unreachable server tried again a few times;
  an API key, when the server needs one, from the ``MEDCAP_JUDGE_API_KEY`` variable;
* ``verdict``: MedEvalKit's reading of a reply (the ``<judge>`` content, or the whole
  reply, stripped, equal to "0");
* ``judge_rows``: the rows a convention sends to the judge, asked a few at a time,
  each reply kept in ``{raw}-judge.jsonl`` as it comes, so a stopped run asks only
  the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medcap.config import ConfigError

API_KEY_ENV = "MEDCAP_JUDGE_API_KEY"
BUSY = (429, 500, 502, 503, 504)  # HTTP statuses tried again
JUDGE_PROMPT = """You are checking an answer to a question about a medical image against the reference answer.
Count the answer as correct when it says the same thing as the reference answer, possibly in other words, \
or gives another valid reading of it; otherwise it is incorrect.

Question: {question}

Reference answer: {answer}

Answer to check: {reply}

Reply in exactly this form, where 0 means correct and 1 means incorrect:
<think>{{one short sentence of reasoning}}</think>
<judge>{{0 or 1}}</judge>

Example: the reference answer is "right frontal lobe" and the answer to check is "the frontal lobe on the \
right"; they mean the same, so:
<think>Both name the right frontal lobe.</think>
<judge>0</judge>"""
PROMPT_DIGEST = hashlib.sha256(JUDGE_PROMPT.encode("utf-8")).hexdigest()[:16]


class JudgeError(ConfigError):
    """The judge could not be reached or gave no usable reply (one line for the user)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient  # worth trying again: busy, or not reachable for a moment


def verdict(reply: str) -> int:
    """1 (correct) when the ``<judge>`` content, or the whole reply when it has none, is "0"."""
    text = reply or ""
    spans, pos = [], 0
    while (start := text.find("<judge>", pos)) >= 0:
        end = text.find("</judge>", start + 7)
        if end < 0:
            break
        spans.append(text[start + 7:end])
        pos = end + 8
    inner = " ".join(spans).strip()
    return int((inner or text).strip() == "0")


class JudgeClient:
    """One judge model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, endpoint: str, model: str, *, max_tokens: int = 512, timeout_s: float = 300.0,
                 api_key: Optional[str] = None, tries: int = 4):
        if not str(endpoint).startswith(("http://", "https://")):
            raise JudgeError(f"judge_endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {endpoint!r}")
        if not model:
            raise JudgeError("judge_endpoint needs judge_model (the model name the endpoint serves)")
        self.endpoint, self.model = str(endpoint).rstrip("/"), str(model)
        self.max_tokens, self.timeout_s, self.tries = int(max_tokens), float(timeout_s), int(tries)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)

    def fingerprint(self) -> Dict[str, Any]:
        return {"endpoint": self.endpoint, "model": self.model, "prompt": PROMPT_DIGEST, "max_tokens": self.max_tokens}

    def _call(self, path: str, body: Optional[Dict[str, Any]] = None, *, tries: int = 1) -> Dict[str, Any]:
        """One request, tried again after 1, 2, 4 ... s when the server is busy or unreachable."""
        for attempt in range(tries):
            try:
                return self._request(path, body)
            except JudgeError as e:
                if attempt == tries - 1 or not e.transient:
                    raise
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def _request(self, path: str, body: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.endpoint + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
        where = f"the judge at {self.endpoint}{path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300].replace("\n", " ")
            raise JudgeError(f"{where} answered HTTP {e.code}: {detail}", transient=e.code in BUSY) from None
        except (urllib.error.URLError, OSError) as e:
            raise JudgeError(f"{where} cannot be reached: {getattr(e, 'reason', e)}", transient=True) from None
        except ValueError:
            raise JudgeError(f"{where} did not answer with JSON") from None

    def check(self) -> None:
        """The endpoint answers and, when it lists its models, serves ``model``."""
        listed = self._call("/models")
        ids = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)] if isinstance(listed, dict) else []
        if ids and self.model not in ids:
            raise JudgeError(f"judge_model={self.model!r} is not served at {self.endpoint} (it serves {ids})")

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The judge's reply to a conversation, greedy."""
        body = {"model": self.model, "messages": [dict(m) for m in messages], "temperature": 0,
                "max_tokens": self.max_tokens}
        answer = self._call("/chat/completions", body, tries=self.tries)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"the judge at {self.endpoint} answered without a message: {str(answer)[:200]}") from None
        return (content or "").strip()

    def ask(self, question: str, answer: str, reply: str) -> str:
        return self.chat([{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer=answer, reply=reply)}])


# ---- Which rows, and judging them


def needs_judge(row: Mapping[str, str], suite: str) -> bool:
    """What MedEvalKit sends to its judge: every SLAKE question, the open questions elsewhere."""
    kind = row.get("answer_type", "")
    if row.get("output", "") == "" or kind not in ("open", "closed"):
        return False
    return suite == "slake" or kind == "open"


def _key(question: str, answer: str, reply: str) -> str:
    return hashlib.sha256(json.dumps([question, answer, reply], ensure_ascii=False).encode("utf-8")).hexdigest()


def judge_rows(client: JudgeClient, rows: Sequence[Mapping[str, str]], suite: str, cache_path: Path, *,
               progress: bool = True, concurrency: int = 4) -> List[Optional[Tuple[int, str]]]:
    """``(verdict, judge reply)`` for each row the judge sees (None for the others), asked
    ``concurrency`` at a time; replies are kept in ``cache_path`` as they come."""
    from medcap._io import progress as progress_bar
    from medcap.eval._conventions import mek_unwrap
    from medcap.eval._results import JsonlCache

    cache = JsonlCache(cache_path, fingerprint=client.fingerprint())
    asks: Dict[str, Tuple[str, str, str]] = {}
    keys: List[Optional[str]] = []
    for r in rows:
        if not needs_judge(r, suite):
            keys.append(None)
            continue
        q = (r.get("question", ""), r.get("output", ""), mek_unwrap(r.get("generated", "") or ""))
        keys.append(_key(*q))
        if keys[-1] not in cache:
            asks[keys[-1]] = q
    bar = progress_bar(len(asks), "judging", "row", enabled=progress)
    pending = list(asks.items())
    with ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
        for lo in range(0, len(pending), max(1, int(concurrency))):
            batch = pending[lo:lo + max(1, int(concurrency))]
            replies = list(pool.map(lambda kq: client.ask(*kq[1]), batch))
            cache.put_many({k: reply for (k, _), reply in zip(batch, replies)})
            bar.update(len(batch))
    bar.close()
    return [None if k is None else (verdict(cache[k]), cache[k]) for k in keys]
