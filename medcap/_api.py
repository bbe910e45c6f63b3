"""``medcap.load``: a trained model in three lines of Python.

    model = medcap.load("RUN/checkpoint/meta_model_last.safetensors")  # or a folder `medcap export` wrote
    model.caption("scan.dcm")                                # -> str
    model.ask(["a.png", "b.png"], "Is there a fracture?")    # -> [str, str], batched together

In order: ``load`` (the model the checkpoint records, or a config's for a reference .pt: the
same resolution as ``medcap caption``, so the same text); ``Model`` with ``caption``, ``ask``
(one image or a list: paths, DICOM files, PIL images; a list goes through the continuous
batcher, ``batch_size`` rows at a time) and ``chat`` (turns about one image). Greedy unless a
``temperature`` is given. A bad checkpoint or image is a ``ValueError`` / ``FileNotFoundError``
saying which and why.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Union

ImageLike = Any  # a path (str / PathLike; PNG, JPEG, DICOM, ...) or a PIL image


# ---- The model


class Model:
    """A loaded model: ``caption``, ``ask`` and ``chat``; ``engine`` (a ``GenerationEngine``)
    and ``config`` (the resolved generation config) for everything else."""

    def __init__(self, captioner: Any, config: Any):
        self._cap = captioner
        self.config = config
        self.engine = captioner.engine

    def __repr__(self) -> str:
        return (f"medcap.Model({self.config.model['_component_']}, "
                f"vision_checkpoint={self.config.vision_checkpoint!r}, "
                f"device={self.engine.device}, dtype={self.config.dtype})")

    def _tensor(self, image: ImageLike):
        from PIL import Image, ImageOps

        from medcap.data import BadSample

        try:
            if isinstance(image, Image.Image):  # the transform makes any mode 8-bit RGB, as for files
                return self._cap.transform(ImageOps.exif_transpose(image))
            if isinstance(image, (str, os.PathLike)):
                return self._cap.image(os.fspath(image))
        except BadSample as e:
            raise ValueError(e.reason) from None
        raise TypeError(f"an image is a file path or a PIL image, got {type(image).__name__}")

    def _generate(self, prompts: List[List[int]], images: List[ImageLike], max_new_tokens: Optional[int]) -> List[str]:
        tensors = [self._tensor(im) for im in images]
        budgets = [min(max_new_tokens or self._cap.max_new_tokens, self._cap.max_seq_len - len(p)) for p in prompts]
        return self.engine.generate_texts(prompts, tensors, budgets, [f"api:{i}" for i in range(len(prompts))])

    def ask(self, images: Union[ImageLike, Sequence[ImageLike]], question: Optional[str], *,
            max_new_tokens: Optional[int] = None) -> Union[str, List[str]]:
        """The answer to ``question`` about each image (``None``: a caption); a list in, a list out."""
        one = not isinstance(images, (list, tuple))
        batch = [images] if one else list(images)
        prompt = self.engine.prompt(question)
        texts = self._generate([prompt] * len(batch), batch, max_new_tokens)
        return texts[0] if one else texts

    def caption(self, images: Union[ImageLike, Sequence[ImageLike]], *,
                max_new_tokens: Optional[int] = None) -> Union[str, List[str]]:
        """A caption of each image: the prompt ``medcap caption`` uses (the image alone)."""
        return self.ask(images, None, max_new_tokens=max_new_tokens)

    def chat(self, image: ImageLike, messages: Sequence[Dict[str, str]], *,
             max_new_tokens: Optional[int] = None) -> str:
        """The next assistant turn of a conversation about ``image``: ``messages`` are
        ``{"role": "user" | "assistant" | "system", "content": str}``; the image goes with the
        first user turn (before its text) unless a turn marks it with ``<image>``."""
        from medcap.data import IMAGE_MARKER
        from medcap.generation import clean_text

        turns = [dict(m) for m in messages]
        if not any(m.get("role") == "user" and IMAGE_MARKER in str(m.get("content", "")) for m in turns):
            first = next((m for m in turns if m.get("role") == "user"), None)
            if first is None:
                raise ValueError("the messages hold no user turn")
            text = clean_text(first.get("content", "")).strip()
            first["content"] = IMAGE_MARKER + ("\n\n" + text if text else "")
        return self._generate([self.engine.prompt(turns)], [image], max_new_tokens)[0]


# ---- Loading


def load(checkpoint: Union[str, os.PathLike], device: Optional[str] = None, dtype: Optional[str] = None, *,
         config: Optional[str] = None, llm: Optional[str] = None, overrides: Sequence[str] = (), batch_size: int = 8,
         max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
         seed: int = 0) -> Model:
    """The model a checkpoint (or an exported folder) records, loaded once.

    Args:
        checkpoint: a ``.safetensors`` medcap trained, a folder ``medcap export`` wrote, or the
            reference's ``.pt`` (then give ``config``, e.g. ``"custom_generation_config"``).
        device: default ``cuda`` when a GPU is present, else ``cpu``.
        dtype: ``bf16``, ``fp16`` or ``fp32``; default the one the model was trained in.
        config, overrides: a generation config (name or path) and ``key=value`` strings, as
            ``medcap caption --config`` takes them; they win over what the checkpoint records.
        llm: the LLM folder, when it is no longer where the checkpoint says.
        batch_size: rows decoded together; max_new_tokens: default the config's (300).
        temperature, top_k, seed: sampling (default greedy).
    """
    from medcap._caption import Captioner, UserError, resolve_model_config

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    args = SimpleNamespace(config=config, checkpoint=os.fspath(checkpoint), llm=llm, device=device, dtype=dtype,
                           max_new_tokens=max_new_tokens)
    try:
        cfg = resolve_model_config(args, list(overrides))
    except UserError as e:
        raise ValueError(str(e)) from None
    cap = Captioner(cfg, temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size)
    return Model(cap, cfg)
