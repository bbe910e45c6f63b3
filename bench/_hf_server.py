"""The serving baseline a user would write without medcap's engine: one request at a time
through transformers' ``generate``, behind the same HTTP interface as ``medcap serve``
(``POST /v1/chat/completions`` with OpenAI's body, ``GET /health``), on 127.0.0.1.

    python bench/_hf_server.py CHECKPOINT [key=value ...] --config CONFIG

The same model as the server it is compared with (``medcap.load``: the same checkpoint
and config); its decoder converted to ``LlamaForCausalLM`` (``_common.to_hf_llama``). A
request's image is decoded and transformed as medcap does it and its prompt built with
the model's chat format (``engine.prompt``): what any server for this model must do.
Then ``model.embed`` gives the prompt's embeddings (image soft tokens included) and
``hf.generate(inputs_embeds=...)`` the answer, greedy, one request at a time (a lock):
the plain loop, no batching. Prints ``listening on URL`` when ready, as ``medcap serve``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from _common import LlamaDims, to_hf_llama


# ---- the model


class Baseline:
    """The loaded model and its one-at-a-time answer."""

    def __init__(self, checkpoint: str, config: str, overrides):
        import medcap
        from medcap.data import image_transform

        loaded = medcap.load(checkpoint, device="cpu", config=config, overrides=list(overrides))
        self.engine, self.model = loaded.engine, loaded.engine.model
        layers = self.model.decoder.layers
        dims = LlamaDims(self.model.tok_embeddings.weight.shape[0], self.model.tok_embeddings.weight.shape[1],
                         len(layers), layers[0].attn.num_heads, layers[0].attn.num_kv_heads,
                         layers[0].mlp.w1.weight.shape[0])
        dtype = self.model.tok_embeddings.weight.dtype
        self.hf = to_hf_llama(self.model, dims, torch.device("cpu"), dtype, max_seq_len=self.model.decoder.max_seq_len)
        self.transform = image_transform(self.model.vision.visual.image_size)
        self.lock = threading.Lock()

    def _messages(self, body: dict):
        """OpenAI messages -> the model's messages and the one image's bytes."""
        from medcap.generation import clean_text, question_messages

        out, image = [], None
        for m in body["messages"]:
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            text = " ".join(p["text"] for p in parts if p["type"] == "text")
            urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
            if urls:
                image = base64.b64decode(urls[0].split(",", 1)[1])
                out.extend(question_messages(text or None))
            else:
                out.append({"role": m["role"], "content": clean_text(text)})
        return out, image

    @torch.inference_mode()
    def answer(self, body: dict) -> dict:
        from medcap.data import decode_image_bytes
        from medcap.generation import decode_text

        messages, data = self._messages(body)
        image = None if data is None else self.transform(decode_image_bytes(data, "request"))
        prompt = self.engine.prompt(messages, has_image=image is not None)
        stop = list(self.engine.tokenizer.stop_tokens)
        with self.lock:  # one request at a time
            embeds = self.model.embed(torch.tensor([prompt]), None if image is None else image[None])  # [1, s, d]
            out = self.hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=int(body.get("max_tokens") or 64), do_sample=False, num_beams=1,
                                   eos_token_id=stop, pad_token_id=self.engine.tokenizer.pad_id)[0].tolist()
        tokens = next((out[:i] for i, t in enumerate(out) if t in stop), out)
        return {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "medcap"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": decode_text(self.engine.tokenizer,
                                                                                                 tokens)},
                             "finish_reason": "stop" if len(tokens) < len(out) else "length"}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                          "total_tokens": len(prompt) + len(tokens)}}


# ---- HTTP


def handler(baseline: Baseline):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # kept-alive connections, as the load test's clients hold them

        def _send(self, status: int, obj: dict) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._send(200 if self.path == "/health" else 404, {"status": "ok"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            try:
                self._send(200, baseline.answer(body))
            except (KeyError, ValueError, IndexError) as e:
                self._send(400, {"error": {"message": f"{type(e).__name__}: {e}"}})

        def log_message(self, *args):
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 64 clients connecting at once are queued, not refused


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as medcap serve on this machine's benches
    server = _Server(("127.0.0.1", args.port), handler(Baseline(args.checkpoint, args.config, args.overrides)))
    print(f"listening on http://127.0.0.1:{server.server_address[1]}/ (one request at a time)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
