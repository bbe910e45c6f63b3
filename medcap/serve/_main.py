"""``medcap serve``: the command line, the model (the generate recipe's config), uvicorn.

    _parser, check_bind, _limits     the flags; a non-loopback address needs an API key
    read_model_config, load_engine   the model, as ``medcap run generate`` loads it
    build_state                      the flags and the model -> ``_app.ServeState``
    serve_main                       the command: checked, the port bound, loaded, then served
                                     (``_connections``: the cap, the timeouts, SIGTERM)

The model is described as for ``medcap run generate``: ``--checkpoint CKPT`` alone (the model
a medcap checkpoint or export folder records), a generation config and ``key=value``
overrides (``model``, ``tokenizer``, ``checkpointer``, ``vision_checkpoint``, ``device``,
``dtype``, ``batch_size``, ``max_new_tokens``, ``temperature``, ``top_k``, ``seed``), or
``--demo DIR`` for the model ``medcap demo`` trained in DIR (``demo/generate``, ``demo_dir=DIR``).
``--backend vllm``: vLLM's server decodes (``load_engine``; stopped when this server stops).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

log = logging.getLogger("medcap.serve")

API_KEY_ENV = "MEDCAP_API_KEY"
DEMO_CONFIG = "demo/generate"


class UserError(Exception):
    pass


# ---- the command line


def _parser() -> argparse.ArgumentParser:
    from medcap._cmdline import accept_snake_case
    from medcap.serve._connections import add_connection_flags
    from medcap.serve._request import Limits

    d = Limits()
    p = argparse.ArgumentParser(
        prog="medcap serve",
        description="Serve a trained model: an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, "
        "GET /health) and a web page at /, on one server. The model is given as for `medcap run generate`: "
        "--checkpoint CKPT (a model that describes itself), --config CONFIG [key=value ...], or --demo DIR for the "
        "demo's trained model.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (vision_checkpoint=..., ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="generation config (name or path), e.g. custom_generation_config")
    src.add_argument("--demo", metavar="DIR", help="the model `medcap demo --out DIR` trained")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="a checkpoint medcap trained or a folder `medcap export` wrote: without --config, the "
                   "model, LLM and tokenizer are the ones it records")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other address needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="default 8000 (0: any free port, printed)")
    p.add_argument("--api-key", default=None,
                   help=f"clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; none on loopback)")
    p.add_argument("--model-name", default="medcap", help="the model id clients name (default medcap)")
    p.add_argument("--batch-size", type=int, default=None, help="requests decoded together (default: the config's)")
    p.add_argument("--max-context", type=int, default=1024,
                   help="prompt + answer tokens per request (default 1024, at most the model's max_seq_len); every "
                   "decode step attends over this many cache columns per slot, so a smaller value is faster")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"the largest max_tokens a request may ask for (default {d.max_tokens}); a request "
                   "without max_tokens gets the config's max_new_tokens")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default {d.max_body_bytes:,}: 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest image, width x height (default {d.max_image_pixels:,}; decompression-bomb guard)")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"requests waiting for a slot before the server answers 503 (default {d.queue_size})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help=f"seconds a request may wait and generate before it is ended (default {d.request_timeout_s:g})")
    p.add_argument("--no-page", action="store_true", help="the API alone, without the web page")
    p.add_argument("--backend", choices=("native", "vllm"), default=None,
                   help="who decodes: medcap's engine (native, the config's default) or vLLM's server, fed the "
                   "prompts' embeddings (vllm; from .venv-vllm/bin/medcap, made by `make vllm`)")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="--backend vllm: GPUs the LLM is split over (vLLM's tensor parallelism)")
    add_connection_flags(p)  # connections: their cap and timeouts, the access log
    return accept_snake_case(p)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as reachable from outside


def check_bind(host: str, api_key: Optional[str]) -> None:
    """Loopback is open to local users only; any other address needs a key."""
    if not is_loopback(host) and not api_key:
        raise UserError(f"--host {host} makes the server reachable from other machines: give an API key "
                        f"(--api-key KEY or ${API_KEY_ENV}); clients send it as 'Authorization: Bearer KEY'")


def _limits(args):
    from medcap.serve._request import Limits

    for name in ("max_tokens", "max_body_bytes", "max_image_pixels", "queue_size", "max_context"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.request_timeout <= 0:
        raise UserError(f"--request-timeout must be > 0, got {args.request_timeout}")
    return Limits(max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                  max_tokens=args.max_tokens, queue_size=args.queue_size, request_timeout_s=args.request_timeout)


# ---- the model


def read_model_config(config: str, overrides: Sequence[str]):
    """The generate recipe's checked ``GenerateConfig`` (no suite needed: nothing is run)."""
    from medcap._cmdline import CLIError
    from medcap._registry import resolve_config
    from medcap.config import FREE_TEXT, ConfigError, GenerateConfig, from_config, must_exist, parse_args, plain

    try:
        _, cfg = parse_args(["--config", str(resolve_config(config)), *overrides], FREE_TEXT)
        data, variables = plain(cfg)
        conf = from_config(GenerateConfig, data, variables=variables)
        conf = dataclasses.replace(conf, images=[conf.tokenizer.get("path")])  # a file check() reads: see below
        conf.check()  # every key, component and path; it wants a suite or an image, hence the line above
        conf = dataclasses.replace(conf, images=None)
        if conf.vision_checkpoint:
            must_exist(conf.vision_checkpoint, "vision_checkpoint", "path")
    except (CLIError, ConfigError) as e:
        raise UserError(str(e)) from None
    if not conf.vision_checkpoint:
        log.warning("vision_checkpoint is null: the vision side is untrained, answers will not describe images")
    return conf


def load_engine(conf, batch_size: Optional[int], max_context: Optional[int] = None):
    """Model + tokenizer loaded as ``medcap run generate`` loads them, in an engine (for
    ``backend=vllm`` a ``VllmEngine``, whose server holds ``max_context`` positions a request)."""
    import torch
    from omegaconf import DictConfig
    from torchtune import config as tt_config

    from medcap.generation import GenerationEngine
    from medcap.models import load_model, resolve_dtype

    device = conf.device
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s but no CUDA device is available: serving on the CPU", device)
        device = "cpu"
    tokenizer = tt_config.instantiate(DictConfig(conf.tokenizer))
    model = load_model(conf.model, dataclasses.asdict(conf.checkpointer), device=torch.device(device),
                       dtype=conf.dtype, tokenizer=tokenizer, vision_checkpoint=conf.vision_checkpoint)
    settings = dict(batch_size=batch_size or conf.batch_size, temperature=float(conf.temperature or 0.0),
                    top_k=conf.top_k, seed=conf.seed if conf.seed is not None else 0)
    if conf.backend == "vllm":
        import shlex

        from medcap.generation import VllmEngine

        return VllmEngine.start(
            model, tokenizer, conf.checkpointer.checkpoint_dir, dtype=conf.dtype, python=conf.vllm_python,
            url=conf.vllm_url, tensor_parallel_size=conf.tensor_parallel_size, extra_args=shlex.split(conf.vllm_args or ""),
            max_model_len=min(int(max_context or model.decoder.max_seq_len), int(model.decoder.max_seq_len)), **settings,
        )
    return GenerationEngine(model, tokenizer, **settings)


def demo_examples(demo_dir: str, n: int = 4) -> List[str]:
    """The first ``n`` held-out images of the demo, from its test captions file
    (``world/test.json``), each found the one way the data loader finds it (the record's
    ``meta`` ``dir=``, relative to the JSON file's folder). Whatever cannot be found is
    logged with where it was looked for; the page then shows the examples that were."""
    from medcap.data import BadSample, parse_record, read_index

    test_json = Path(demo_dir) / "world" / "test.json"
    try:
        index = read_index(test_json)
    except (OSError, ValueError) as e:
        log.warning("no demo examples on the page: %s", e)
        return []
    found: List[str] = []
    for i in range(len(index)):
        if len(found) == n:
            break
        try:
            rec = parse_record(index[i], json_dir=index.file_of(i).parent)
        except BadSample as e:
            log.warning("demo example %s skipped: %s", index.origin(i), e)
            continue
        if rec.image_path is None:
            continue
        if not rec.image_path.is_file():
            log.warning("demo example %s skipped: its image is not found (looked at %s)", index.origin(i),
                        ", ".join(str(c) for c in rec.image_candidates))
            continue
        found.append(str(rec.image_path.resolve()))
    return found


# ---- the server


def build_state(args):
    from medcap.serve._app import ServeState

    limits = _limits(args)
    config, overrides = args.config, list(args.overrides)
    if args.checkpoint:
        overrides.append(f"vision_checkpoint={args.checkpoint}")
    if config is None and not args.demo:
        if not any(o.startswith("vision_checkpoint=") for o in overrides):
            raise UserError("give --checkpoint CKPT (a checkpoint medcap trained, or a folder `medcap export` wrote), "
                            "--config CONFIG [key=value ...], or --demo DIR")
        from medcap._registry import CHECKPOINT_CONFIG

        config = CHECKPOINT_CONFIG  # the model the checkpoint records
    if args.demo:
        if not os.path.isdir(args.demo):
            raise UserError(f"--demo {args.demo!r} is not a folder: run `medcap demo --out {args.demo}` first")
        config, overrides = DEMO_CONFIG, [f"demo_dir={args.demo}", *overrides]
    overrides += [f"{k}={v}" for k, v in (("backend", args.backend), ("tensor_parallel_size", args.tensor_parallel_size))
                  if v is not None]  # the flags are the config's keys
    conf = read_model_config(config, overrides)
    from medcap.generation import VllmError
    from medcap.serve._vllm_worker import VllmWorker
    from medcap.serve._worker import BatchWorker

    try:
        engine = load_engine(conf, args.batch_size, args.max_context)
    except VllmError as e:  # --backend vllm: its server did not start; one line, naming its log
        raise UserError(str(e)) from None
    try:
        return ServeState(engine, limits=limits, model_name=args.model_name, cache_len=args.max_context,
                          default_max_tokens=min(conf.max_new_tokens, limits.max_tokens), api_key=args.api_key,
                          examples=demo_examples(args.demo) if args.demo else [],
                          worker_class=VllmWorker if conf.backend == "vllm" else BatchWorker)
    except BaseException:
        getattr(engine, "close", lambda: None)()  # a vLLM server started for it stops
        raise


def _serve(argv: List[str]) -> int:
    from medcap.serve._connections import connection_cap, connection_limits, open_listener, serve_forever

    args = _parser().parse_intermixed_args(argv)
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, args.api_key)  # before minutes of loading
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    limits = connection_limits(args)
    listener = open_listener(args.host, args.port)  # the port is ours (or refused) before the model loads
    state = None
    try:
        connection_cap(limits.max_connections, warn=False)  # the open-file limit checked before loading too
        state = build_state(args)
        from medcap.serve._app import create_app

        app = create_app(state, page=not args.no_page, access_log=not args.no_access_log)
        by_sigterm = serve_forever(app, listener, limits, connection_cap(limits.max_connections))
    finally:
        listener.close()
        close = getattr(getattr(state, "engine", None), "close", None)  # --backend vllm: its server stops with this one
        if close is not None:
            close()
    cut = state.access_counts.get("cut", 0)
    if cut:
        log.error("stopped: %d request(s) were cut at the --drain-timeout of %g s", cut, limits.drain_timeout_s)
        return 1
    if by_sigterm:
        log.info("stopped by SIGTERM after finishing every request in progress")
    return 0


def serve_main(argv: Sequence[str]) -> int:
    """``medcap serve ...``"""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page phones nobody
    from medcap._io import quiet_library_noise
    from medcap.serve._connections import ListenError

    quiet_library_noise()
    try:
        return _serve(list(argv))
    except (UserError, ListenError) as e:
        print(f"medcap serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (FileNotFoundError, PermissionError, ValueError, OSError) as e:
        print(f"medcap serve: error: {e}", file=sys.stderr, flush=True)
        return 2
