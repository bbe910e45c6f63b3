"""``medcap serve``: a trained model behind an OpenAI-compatible HTTP API and a web page.

    medcap serve --demo DIR                     # the demo's model on 127.0.0.1:8000
    medcap serve --config custom_generation_config vision_checkpoint=RUN/...safetensors

One process loads the model once; every request (API or page) goes through one
batching worker (``_worker``), so concurrent requests share the engine's batch.
Request checking lives in ``_request`` (OpenAI's request as pydantic models, the
image, the limits), the routes in ``_app``, the Gradio page in ``_page``, the command
line and model setup in ``_main``. Nothing heavy is imported before the command line
has been read.
"""

from __future__ import annotations


def serve_main(argv):
    """``medcap serve ...``"""
    from medcap.serve._main import serve_main as _serve_main

    return _serve_main(argv)


__all__ = ["serve_main"]
