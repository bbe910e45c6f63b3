"""Checkpoints of the trained part, the image tower and the projector, in two formats
chosen by the file's suffix:

* ``.safetensors`` (medcap's): flat keys ``visual.*`` and ``projector.*``; a JSON of
  metadata (sizes, image-token count, source, medcap version, and from training the
  model's description) in the safetensors header, which decides, and a copy beside the
  file as ``<name>.json`` for people; a folder ``medcap export`` wrote holds one;
* ``.pt`` / ``.pth``: the reference's ``torch.save({'visual': ..., 'projector': ...})``.

In order: what is saved or loaded into (a model or its encoder, their sizes); saving
(``save_vision_checkpoint``, every write through ``medcap._io.atomic_write``);
loading (``load_vision_checkpoint`` reads a file and checks it; ``load_vision_weights``
puts it into a model, refusing a size mismatch in model terms before any weight moves).
Loading never unpickles code (``weights_only=True``); a damaged file or sidecar fails
naming the file ("truncated or corrupt"); NaN or inf is refused by name. Why the header
and not the sidecar decides: ``docs/internals.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from medcap._io import EXPORT_CONFIG, EXPORT_VISION, HEADER_KEY, atomic_write

log = logging.getLogger("medcap.models")

VisionState = Dict[str, Dict[str, torch.Tensor]]

FORMAT_NAME = "medcap-vision"
FORMAT_VERSION = 2  # 2: the metadata may describe the model (medcap.training._describe)
SAFETENSORS_SUFFIXES = (".safetensors",)
LEGACY_SUFFIXES = (".pt", ".pth")
_HEADER_KEY = HEADER_KEY  # safetensors header metadata key holding our JSON
_PARTS = ("visual", "projector")


def _medcap_version() -> str:
    try:
        from importlib.metadata import version

        return version("medcap")
    except Exception:  # not installed (running from a bare checkout)
        return "unknown"


# ---- What is saved or loaded into

def _vision_encoder(obj: Any) -> nn.Module:
    """The ``VisionEncoder`` of a ``MedcapModel``, or the encoder itself."""
    vision = getattr(obj, "vision", None)
    if isinstance(vision, nn.Module) and hasattr(vision, "visual") and hasattr(vision, "projector"):
        return vision
    if isinstance(obj, nn.Module) and hasattr(obj, "visual") and hasattr(obj, "projector"):
        return obj
    raise TypeError(
        f"expected a MedcapModel or a VisionEncoder (with .visual and .projector), got {type(obj).__name__}"
    )


def _encoder_state(encoder: nn.Module) -> VisionState:
    return {part: getattr(encoder, part).state_dict() for part in _PARTS}


def _sizes(state: VisionState) -> Dict[str, int]:
    """Sizes readable from the tensors alone (no guessing beyond the ViT layout)."""
    v, p = state.get("visual", {}), state.get("projector", {})
    out: Dict[str, int] = {}
    if "head.proj.weight" in v:
        out["vision_output_dim"] = int(v["head.proj.weight"].shape[0])
        out["vision_width"] = int(v["head.proj.weight"].shape[1])
    blocks = {k.split(".")[2] for k in v if k.startswith("trunk.blocks.")}
    if blocks:
        out["vision_depth"] = len(blocks)
    patch = v.get("trunk.patch_embed.proj.weight")
    pos = v.get("trunk.pos_embed")
    if patch is not None:
        out["patch_size"] = int(patch.shape[-1])
        if pos is not None:
            n = int(pos.shape[1]) - (1 if "trunk.cls_token" in v else 0)
            grid = math.isqrt(max(n, 0))
            if grid * grid == n:
                out["image_size"] = grid * int(patch.shape[-1])
    if "0.weight" in p:
        out["projector_in_dim"] = int(p["0.weight"].shape[1])
        out["projector_hidden_dim"] = int(p["0.weight"].shape[0])
    if "2.weight" in p:
        out["projector_out_dim"] = int(p["2.weight"].shape[0])
    return out


def _encoder_sizes(encoder: nn.Module) -> Dict[str, int]:
    sizes = _sizes(_encoder_state(encoder))
    sizes["num_image_tokens"] = int(encoder.num_image_tokens)
    sizes["embed_dim"] = int(encoder.embed_dim)
    if hasattr(encoder.visual, "image_size"):
        sizes["image_size"] = int(encoder.visual.image_size)
    return sizes


# ---- Saving

def _cpu_tensors(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state entry {k!r} is a {type(t).__name__}, not a tensor")
        out[k] = t.detach().to("cpu").contiguous()
    return out


def sidecar_path(path: Union[str, Path]) -> Path:
    """Where the metadata JSON of a ``.safetensors`` vision checkpoint is written."""
    return Path(path).with_suffix(".json")


def save_vision_checkpoint(
    model_or_encoder: Any,
    path: Union[str, Path],
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Save the image tower and projector.

    Args:
        model_or_encoder: a ``MedcapModel``, its ``VisionEncoder``, or an already
            gathered ``{"visual": state_dict, "projector": state_dict}`` (e.g. from
            FSDP; then pass ``num_image_tokens`` and ``embed_dim`` in ``metadata``).
        path: ``*.safetensors`` (with metadata) or ``*.pt`` / ``*.pth`` (the reference's format).
        metadata: extra JSON-able entries (epoch, step, source, ...) merged over the sizes.

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + LEGACY_SUFFIXES:
        raise ValueError(
            f"cannot tell the checkpoint format from {str(path)!r}: use a .safetensors name "
            "(medcap's format, with metadata) or .pt (the reference's {'visual','projector'} dict)"
        )
    state, sizes = _state_and_sizes(model_or_encoder)
    meta = _metadata(sizes, metadata)

    if suffix in LEGACY_SUFFIXES:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    flat = {f"{part}.{k}": t for part in _PARTS for k, t in state[part].items()}
    text = json.dumps(meta, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt", _HEADER_KEY: text}))
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def _state_and_sizes(model_or_encoder: Any) -> Tuple[VisionState, Dict[str, int]]:
    """The tensors to save (on the CPU, contiguous) and the sizes they imply."""
    if isinstance(model_or_encoder, Mapping):
        if set(model_or_encoder) != set(_PARTS):
            raise ValueError(f"a state mapping needs exactly the keys {list(_PARTS)}, got {sorted(model_or_encoder)}")
        state = {part: _cpu_tensors(model_or_encoder[part]) for part in _PARTS}
        return state, _sizes(state)
    encoder = _vision_encoder(model_or_encoder)
    state = {part: _cpu_tensors(sd) for part, sd in _encoder_state(encoder).items()}
    return state, _encoder_sizes(encoder)


def _metadata(sizes: Dict[str, int], extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The format, the sizes, who wrote it and when, then the caller's entries; refused when
    the caller's token count and width do not give the projector's output size."""
    meta: Dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **sizes,
        "created_by": f"medcap {_medcap_version()}",
        "medcap_version": _medcap_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(dict(extra or {}))
    t, d, out = meta.get("num_image_tokens"), meta.get("embed_dim"), sizes.get("projector_out_dim")
    if t is not None and d is not None and out is not None and int(t) * int(d) != out:
        raise ValueError(
            f"metadata says {t} image tokens of {d} = {int(t) * int(d)} values, "
            f"but the projector outputs {out}"
        )
    return meta


# ---- Loading

def _split_flat(flat: Mapping[str, Any], where: str) -> VisionState:
    """``visual.*`` / ``projector.*`` keys (or a whole MedcapModel's ``encoders.image.*``)."""
    for vis, proj in (("visual.", "projector."), ("encoders.image.visual.", "encoders.image.projector.")):
        state: VisionState = {
            "visual": {k[len(vis):]: t for k, t in flat.items() if k.startswith(vis)},
            "projector": {k[len(proj):]: t for k, t in flat.items() if k.startswith(proj)},
        }
        if state["visual"] or state["projector"]:
            break
    if state["visual"] and not state["projector"]:
        hint = ""
        if any(k.startswith("text.") for k in flat) or "logit_scale" in flat:
            hint = " It looks like an open_clip (BiomedCLIP) checkpoint: give it as vision_pretrained instead."
        raise ValueError(f"{where} holds an image tower but no projector.{hint}")
    used = {vis + k for k in state["visual"]} | {proj + k for k in state["projector"]}
    stray = sorted(set(flat) - used)
    if not state["visual"] or stray:
        raise ValueError(
            f"{where} is not a medcap vision checkpoint: expected 'visual.*' and 'projector.*' "
            f"tensors, found {stray[:6] or sorted(flat)[:6]}"
        )
    return state


def _check_tensors(state: VisionState, where: str) -> VisionState:
    for part in _PARTS:
        sd = state[part]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{where}: '{part}' is a {type(sd).__name__}, not a state dict")
        bad = [k for k, t in sd.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise ValueError(f"{where}: '{part}' entries that are not tensors: {bad[:5]}")
    return {part: dict(state[part]) for part in _PARTS}


def _corrupt(path: Path, e: BaseException, what: str = "vision checkpoint") -> ValueError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ValueError(
        f"{what} {str(path)!r} is truncated or corrupt ({type(e).__name__}: {first}); "
        "re-save it or copy it again"
    )


def _refuses_code(e: pickle.UnpicklingError) -> bool:
    """torch's weights-only unpickler met a class or function (not a damaged byte stream)."""
    text = str(e)
    return "GLOBAL" in text or "Unsupported global" in text


def _load_legacy(path: Path) -> Tuple[VisionState, Dict[str, Any]]:
    where = repr(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _refuses_code(e):
            raise _corrupt(path, e) from e
        raise ValueError(
            f"{where} holds more than tensors and plain containers, and medcap never runs code "
            f"from a checkpoint file (torch.load weights_only=True refused it: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        # torch reports a cut zip as RuntimeError (miniz), an empty file as EOFError and a
        # record running past the end as OSError EINVAL.
        raise _corrupt(path, e) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a dict of state dicts")
    if "visual" in obj and "projector" in obj and isinstance(obj["visual"], Mapping):
        state = {part: obj[part] for part in _PARTS}
    else:
        state = _split_flat(obj, where)
    return _check_tensors(state, where), {"checkpoint_format": "legacy-pt"}


def _read_json(path: Path, text: str, what: str) -> Dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise _corrupt(path, e, what) from e
    if not isinstance(meta, dict):
        raise _corrupt(path, TypeError(f"a JSON {type(meta).__name__}, not an object"), what)
    return meta


def _sidecar_meta(path: Path, header_meta: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The sidecar, read only to catch damage and disagreement: the header decides."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        text = side.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _corrupt(side, e, f"metadata of {path.name}") from e
    meta = _read_json(side, text, f"metadata of {path.name}")
    if header_meta is not None and meta != header_meta:
        differ = sorted(k for k in set(meta) | set(header_meta) if meta.get(k) != header_meta.get(k))
        log.warning(
            "%s does not describe the weights in %s (differs in %s); using the metadata stored in the "
            "weights file itself", side, path, ", ".join(differ[:8]),
        )
    return meta


def _load_safetensors(path: Path) -> Tuple[VisionState, Dict[str, Any]]:
    where = repr(str(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _corrupt(path, e) from e
    header_meta = _read_json(path, header[_HEADER_KEY], "vision checkpoint") if _HEADER_KEY in header else None
    side_meta = _sidecar_meta(path, header_meta)
    meta: Dict[str, Any] = dict(header_meta if header_meta is not None else side_meta or {})
    meta["checkpoint_format"] = "safetensors"
    return _split_flat(flat, where), meta


def _check_finite(state: VisionState, path: Path) -> None:
    for part in _PARTS:
        for k, t in state[part].items():
            if t.is_floating_point() or t.is_complex():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ValueError(
                        f"vision checkpoint {str(path)!r}: tensor {part}.{k} holds {bad} non-finite "
                        f"value(s) (NaN or inf) of {t.numel()}; refusing to load weights from a diverged run"
                    )


def load_vision_checkpoint(path: Union[str, Path]) -> Tuple[VisionState, Dict[str, Any]]:
    """Read a vision checkpoint without touching any model.

    Returns ``({"visual": state_dict, "projector": state_dict}, metadata)``; the
    metadata holds what the file stored plus the sizes readable from the tensors.
    ``path`` may be a folder ``medcap export`` wrote (its ``vision.safetensors`` is read).
    """
    path = Path(path)
    if path.is_dir():  # a folder `medcap export` wrote: its vision file is a checkpoint of this format
        for name in (EXPORT_CONFIG, EXPORT_VISION):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{str(path / name)!r} is missing: {str(path)!r} is not a complete medcap export")
        path = path / EXPORT_VISION
    if not path.is_file():
        raise FileNotFoundError(f"vision checkpoint not found: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state, meta = _load_safetensors(path)
    elif suffix in LEGACY_SUFFIXES + (".bin",):
        state, meta = _load_legacy(path)
    else:
        raise ValueError(f"unknown vision checkpoint suffix {path.suffix!r} ({str(path)!r}): use .safetensors or .pt")
    _check_finite(state, path)
    for k, v in _sizes(state).items():
        meta.setdefault(k, v)
    meta["path"] = str(path)
    return state, meta


def _size_problems(model: Dict[str, int], ckpt: Dict[str, Any]) -> list:
    problems = []
    t, d = model["num_image_tokens"], model["embed_dim"]
    ct, cd, cout = ckpt.get("num_image_tokens"), ckpt.get("embed_dim"), ckpt.get("projector_out_dim")
    if ct is not None and cd is not None and (int(ct), int(cd)) != (t, d):
        problems.append(f"checkpoint projector makes {ct} tokens of {cd}, model expects {t} tokens of {d}")
    elif cout is not None and cout != t * d:
        guess = f" (= {cout // d} tokens of {d}?)" if cout % d == 0 else ""
        problems.append(
            f"checkpoint projector outputs {cout} values per image{guess}, "
            f"model expects {t} tokens of {d} = {t * d}"
        )
    names = {
        "vision_output_dim": "image tower output size",
        "projector_in_dim": "projector input size",
        "projector_hidden_dim": "projector hidden size",
        "vision_width": "ViT width",
        "vision_depth": "ViT depth (blocks)",
        "patch_size": "ViT patch size",
        "image_size": "image size",
    }
    for key, what in names.items():
        if key in model and key in ckpt and int(ckpt[key]) != model[key]:
            problems.append(f"{what}: checkpoint {ckpt[key]}, model {model[key]}")
    return problems


def load_vision_weights(model_or_encoder: Any, path: Union[str, Path]) -> Dict[str, Any]:
    """Load a vision checkpoint (either format) into a ``MedcapModel`` or ``VisionEncoder``.

    Strict: every tensor must have a place and the same size. A size mismatch is
    reported in model terms (tokens, widths, image size) before any weight moves.
    Returns the checkpoint's metadata.
    """
    encoder = _vision_encoder(model_or_encoder)
    if any(p.is_meta for p in encoder.parameters()):
        raise ValueError("the vision encoder is on the meta device, where loading would silently do nothing")
    state, meta = load_vision_checkpoint(path)
    model_sizes = _encoder_sizes(encoder)
    problems = _size_problems(model_sizes, meta)
    for part in _PARTS:
        own = getattr(encoder, part).state_dict()
        theirs = state[part]
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        if missing:
            problems.append(f"{part}: missing from the checkpoint: {missing[:6]}")
        if unexpected:
            problems.append(f"{part}: not in the model: {unexpected[:6]}")
        for k in sorted(set(own) & set(theirs)):
            if own[k].shape != theirs[k].shape:
                problems.append(f"{part}.{k}: checkpoint {list(theirs[k].shape)}, model {list(own[k].shape)}")
    if problems:
        raise ValueError(
            f"vision checkpoint {str(path)!r} does not fit the model:\n  " + "\n  ".join(problems[:12])
        )
    with torch.no_grad():
        for part in _PARTS:
            getattr(encoder, part).load_state_dict(state[part], strict=True)
    return meta
