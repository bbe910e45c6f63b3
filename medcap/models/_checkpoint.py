"""Weights to and from disk: the frozen Llama from a Hugging Face folder, the trained vision
side in medcap's or the reference's format, and ``load_model``, which builds a model and fills it.

Llama weights from a Hugging Face checkpoint directory into a ``MedcapModel``'s decoder.

The reading and the HF -> torchtune key conversion are torchtune's own
(``FullModelHFCheckpointer``); medcap only points it at the right files
and checks that what comes out is exactly the decoder, no more and no less.

Checkpoints of the trained part: the image tower and the projector.

Two formats, chosen by the file's suffix:

* ``.safetensors`` (what medcap writes by default): flat keys ``visual.*`` and
  ``projector.*``, with a JSON of metadata (sizes, image-token count, source,
  medcap version) in the safetensors header and, for people and scripts,
  beside the file as ``<name>.json``.
* ``.pt`` / ``.pth``: the reference's ``torch.save({'visual': tower_sd,
  'projector': projector_sd})``, which its published checkpoint uses.

The metadata that counts is the copy in the safetensors header: it is written in
the same file as the weights, so it cannot describe other weights. The sidecar
JSON is informational; on load it is still read, and a damaged one is an error
while one that disagrees with the header (a crash between the two writes, a file
copied over) is logged and ignored. A file without header metadata (not written
by medcap) falls back to its sidecar.

Loading never unpickles code: ``.pt`` files are read with
``torch.load(weights_only=True)``; a truncated or damaged file of either format,
or a damaged sidecar, fails naming the file and saying "truncated or corrupt";
a tensor holding NaN or inf is refused by name. Every write goes through
``medcap._io.atomic_write`` (temporary file in the target folder, ``os.replace``,
permissions from the umask, a full disk reported as such), so a crash mid-save
leaves the previous checkpoint whole.

Building a ``MedcapModel`` with its weights: written once for training and generation.

Both recipes and ``medcap caption`` go through :func:`load_model`: build the
config's ``model`` section in a dtype on a device, check that the tokenizer
belongs to it, load the Llama weights from a Hugging Face folder, load the
trained vision side when a checkpoint is given, then freeze. The only
difference between training and generation is what stays trainable (the vision
tower and projector, or nothing).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torchtune import config as tt_config
from torchtune import training
from torchtune import training as tt_training
from torchtune.training import FullModelHFCheckpointer
from torchtune.training.checkpointing import ModelType
from torchtune.training.checkpointing import _checkpointer as _tt_checkpointer

from medcap._io import atomic_write
from medcap.models._model import MedcapModel, assert_only_vision_trainable

# ---- Llama weights from a Hugging Face folder ------------------------------------

log = logging.getLogger("medcap.models")

CheckpointFiles = Union[List[str], Dict[str, str]]

_DECODER_PREFIX = "decoder."


def _default_checkpoint_files(checkpoint_dir: Path) -> List[str]:
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {str(checkpoint_dir)!r}; pass checkpoint_files, or point "
            "checkpoint_dir at the Hugging Face model folder (for Llama-3.1-8B-Instruct it holds "
            "model-00001-of-00004.safetensors ... and config.json)"
        )
    return files


def _check_inputs(checkpoint_dir: Path, checkpoint_files: CheckpointFiles, model_type: str) -> None:
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {str(checkpoint_dir)!r}")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} has no config.json, which the HF checkpointer needs for the "
            "head counts: is it a Hugging Face model folder?"
        )
    if model_type not in ModelType.__members__:
        raise ValueError(f"unknown model_type {model_type!r}; torchtune knows {sorted(ModelType.__members__)}")
    if isinstance(checkpoint_files, dict):
        if set(checkpoint_files) != {"filename_format", "max_filename"}:
            raise ValueError(
                "checkpoint_files as a dict needs exactly the keys 'filename_format' and 'max_filename', "
                f"got {sorted(checkpoint_files)}"
            )
        return
    missing = [f for f in checkpoint_files if not (checkpoint_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint files not found in {str(checkpoint_dir)!r}: {missing}")


def _scratch_parent(checkpoint_dir: Path) -> Optional[str]:
    """A folder for the checkpointer's (unused) output_dir: torchtune refuses one
    inside the checkpoint directory, so skip candidates that lie there."""
    ckpt = checkpoint_dir.resolve()
    for cand in (Path(tempfile.gettempdir()), Path.cwd(), ckpt.parent):
        c = cand.resolve()
        if c != ckpt and ckpt not in c.parents:
            return str(c)
    return None


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


@contextlib.contextmanager
def _log_each_shard(num_shards: int):
    """Log every shard torchtune's checkpointer reads (name, size, seconds): the 8B
    model's four shards take minutes on a slow disk, which should not look like a hang.
    The checkpointer reads through its module's ``safe_torch_load``, wrapped here
    for the duration of one load (left alone if a torchtune release renames it)."""
    inner = getattr(_tt_checkpointer, "safe_torch_load", None)
    if inner is None:
        yield
        return
    done = [0]

    def load(path, *args, **kwargs):
        start = time.perf_counter()
        state = inner(path, *args, **kwargs)
        done[0] += 1
        log.info(
            "LLM shard %d/%d %s (%s) read in %.1f s",
            done[0], num_shards, os.path.basename(str(path)), _size(os.path.getsize(path)), time.perf_counter() - start,
        )
        return state

    _tt_checkpointer.safe_torch_load = load
    try:
        yield
    finally:
        _tt_checkpointer.safe_torch_load = inner


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_llama_weights(
    model: nn.Module,
    checkpoint_dir: Union[str, Path],
    checkpoint_files: Optional[CheckpointFiles] = None,
    model_type: str = "LLAMA3",
) -> Dict[str, Any]:
    """Load an HF-format Llama checkpoint into ``model.decoder`` (the vision side is untouched).

    Args:
        model: a :class:`~medcap.models.MedcapModel` (anything with torchtune's
            ``EarlyFusionModel`` layout: ``decoder.*`` plus ``tok_embeddings``).
        checkpoint_dir: the HF model folder (``config.json`` + safetensors shards).
        checkpoint_files: shard names, torchtune's ``{"filename_format", "max_filename"}``
            dict, or ``None`` for every ``*.safetensors`` in the folder.
        model_type: torchtune's model type name (``LLAMA3`` for Llama 3.x).

    Returns:
        ``{"checkpoint_dir", "num_tensors"}`` for logging.

    Raises:
        ValueError: when the checkpoint's tensors are not exactly the decoder's
            (names or shapes), listing what is missing, unexpected or mis-sized.
    """
    ckpt_dir = Path(checkpoint_dir)
    if checkpoint_files is None:
        _check_inputs(ckpt_dir, [], model_type)
        checkpoint_files = _default_checkpoint_files(ckpt_dir)
    _check_inputs(ckpt_dir, checkpoint_files, model_type)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model is on the meta device, where loading would silently do nothing; "
            "build it on a real device first"
        )

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medcap-ckpt-", dir=_scratch_parent(ckpt_dir)) as scratch:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(ckpt_dir),
            checkpoint_files=checkpoint_files,
            model_type=model_type,
            output_dir=scratch,
        )
        paths = [Path(p) for p in getattr(checkpointer, "_checkpoint_paths", [])]
        total = sum(p.stat().st_size for p in paths if p.is_file())
        log.info("loading the LLM from %s: %d shard(s), %s", ckpt_dir, len(paths), _size(total))
        with _log_each_shard(len(paths)):
            tune_sd = checkpointer.load_checkpoint()[training.MODEL_KEY]

    # EarlyFusionModel keeps the decoder's embedding at ``model.tok_embeddings`` but
    # reports it (and accepts it back) as ``decoder.tok_embeddings.*`` through its
    # state-dict hooks, so plain ``decoder.`` prefixes line up with its state dict.
    full_sd = {_DECODER_PREFIX + k: v for k, v in tune_sd.items()}
    model_sd = model.state_dict()
    expected = {k for k in model_sd if k.startswith(_DECODER_PREFIX)}
    got = set(full_sd)
    missing, unexpected = expected - got, got - expected
    mis_sized = [
        f"{k}: checkpoint {list(full_sd[k].shape)}, model {list(model_sd[k].shape)}"
        for k in sorted(expected & got)
        if full_sd[k].shape != model_sd[k].shape
    ]
    if missing or unexpected or mis_sized:
        lines = [f"the checkpoint in {str(ckpt_dir)!r} does not match the model's decoder:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {_short(unexpected)}")
        if mis_sized:
            lines.append(f"  different sizes ({len(mis_sized)}): " + "; ".join(mis_sized[:6]))
        lines.append("  (are the model builder's sizes those of the checkpoint's config.json?)")
        raise ValueError("\n".join(lines))

    with torch.no_grad():
        result = model.load_state_dict(full_sd, strict=False)
    # Only the vision side may be left out; anything else means the hooks moved keys.
    stray = [k for k in result.missing_keys if k.startswith(_DECODER_PREFIX) or k.startswith("tok_embeddings")]
    if stray or result.unexpected_keys:
        raise RuntimeError(
            f"decoder weights did not all land: missing {stray[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    log.info("LLM loaded: %d tensors in %.1f s", len(full_sd), time.perf_counter() - start)
    return {"checkpoint_dir": str(ckpt_dir), "num_tensors": len(full_sd)}


# ---- Vision checkpoints ----------------------------------------------------------

VisionState = Dict[str, Dict[str, torch.Tensor]]

FORMAT_NAME = "medcap-vision"
FORMAT_VERSION = 1
SAFETENSORS_SUFFIXES = (".safetensors",)
LEGACY_SUFFIXES = (".pt", ".pth")
_HEADER_KEY = "medcap"  # safetensors header metadata key holding our JSON
_PARTS = ("visual", "projector")


def _medcap_version() -> str:
    try:
        from importlib.metadata import version

        return version("medcap")
    except Exception:  # not installed (running from a bare checkout)
        return "unknown"


# ---------------------------------------------------------------------------------------
# what we are saving or loading into


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


# ---------------------------------------------------------------------------------------
# saving


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
    if isinstance(model_or_encoder, Mapping):
        if set(model_or_encoder) != set(_PARTS):
            raise ValueError(f"a state mapping needs exactly the keys {list(_PARTS)}, got {sorted(model_or_encoder)}")
        state = {part: _cpu_tensors(model_or_encoder[part]) for part in _PARTS}
        sizes = _sizes(state)
    else:
        encoder = _vision_encoder(model_or_encoder)
        state = {part: _cpu_tensors(sd) for part, sd in _encoder_state(encoder).items()}
        sizes = _encoder_sizes(encoder)

    meta: Dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **sizes,
        "created_by": f"medcap {_medcap_version()}",
        "medcap_version": _medcap_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(dict(metadata or {}))
    t, d, out = meta.get("num_image_tokens"), meta.get("embed_dim"), sizes.get("projector_out_dim")
    if t is not None and d is not None and out is not None and int(t) * int(d) != out:
        raise ValueError(
            f"metadata says {t} image tokens of {d} = {int(t) * int(d)} values, "
            f"but the projector outputs {out}"
        )

    if suffix in LEGACY_SUFFIXES:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    flat = {f"{part}.{k}": t for part in _PARTS for k, t in state[part].items()}
    text = json.dumps(meta, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt", _HEADER_KEY: text}))
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


# ---------------------------------------------------------------------------------------
# loading


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
    """
    path = Path(path)
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


# ---- load_model ------------------------------------------------------------------

# The one table of dtype names the configs accept (the ``dtype`` key).
DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: Union[str, torch.dtype], key: str = "dtype") -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r}; choose one of {list(DTYPES)}")
    return DTYPES[name]


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(cfg_model: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype, skip_pretrained: bool = False) -> MedcapModel:
    """``cfg_model`` (``_component_`` + its arguments) instantiated in ``dtype`` on ``device``.

    ``skip_pretrained``: the vision weights come from a checkpoint, so BiomedCLIP's
    pretrained weights (``vision_pretrained``) would be overwritten at once; not
    reading them also avoids a download.
    """
    if not isinstance(cfg_model, DictConfig):
        cfg_model = OmegaConf.create(dict(cfg_model))
    overrides: Dict[str, Any] = {}
    if skip_pretrained and cfg_model.get("vision_pretrained"):
        log.info("model.vision_pretrained not read: the vision weights come from a checkpoint")
        overrides["vision_pretrained"] = None
    with tt_training.set_default_dtype(dtype), torch.device(device):
        model = tt_config.instantiate(cfg_model, **overrides)
    if not isinstance(model, MedcapModel):
        raise TypeError(
            f"model._component_={cfg_model.get('_component_')!r} built a {type(model).__name__}, "
            "not a MedcapModel (e.g. medcap.models.medcap_llama3_1_8b)"
        )
    return model


def check_tokenizer(tokenizer: Any, model: MedcapModel) -> None:
    """A tokenizer from another model would put its placeholders where the model
    looks for none: refuse the pair before any weight is read."""
    image_id = getattr(tokenizer, "image_id", None)
    if image_id != model.image_token_id:
        raise ValueError(
            f"the tokenizer's image id ({image_id}) is not the model's image_token_id "
            f"({model.image_token_id}): tokenizer and model do not belong together"
        )


def load_model(
    cfg_model: Mapping[str, Any],
    cfg_checkpointer: Mapping[str, Any],
    *,
    device: Union[str, torch.device],
    dtype: Union[str, torch.dtype],
    tokenizer: Any = None,
    vision_checkpoint: Optional[str] = None,
    train_vision: bool = False,
    vision_weights_follow: bool = False,
) -> MedcapModel:
    """The fused model, weights loaded, frozen as the caller needs.

    Args:
        cfg_model: the config's ``model`` section (``_component_`` + arguments).
        cfg_checkpointer: the config's ``checkpointer`` section; read are
            ``checkpoint_dir``, ``checkpoint_files`` (default: every
            ``*.safetensors``) and ``model_type`` (default ``LLAMA3``).
        device, dtype: where and in what to build (``dtype`` a name of :data:`DTYPES`).
        tokenizer: when given, its ``image_id`` must be the model's.
        vision_checkpoint: the trained vision tower + projector (``.safetensors`` or ``.pt``).
        train_vision: training: the vision side stays trainable (and only it,
            checked); otherwise everything is frozen and the model is in eval mode.
        vision_weights_follow: the caller loads the vision weights later (a
            resume), so ``vision_pretrained`` is not read either.
    """
    dtype = resolve_dtype(dtype)
    model = build_model(
        cfg_model, device=torch.device(device), dtype=dtype,
        skip_pretrained=bool(vision_checkpoint) or vision_weights_follow,
    )
    if tokenizer is not None:
        check_tokenizer(tokenizer, model)
    load_llama_weights(
        model,
        cfg_checkpointer["checkpoint_dir"],
        checkpoint_files=_plain(cfg_checkpointer.get("checkpoint_files")),
        model_type=cfg_checkpointer.get("model_type") or "LLAMA3",
    )
    if vision_checkpoint:
        load_vision_weights(model, vision_checkpoint)
        log.info("vision tower and projector loaded from %s", vision_checkpoint)
    elif not train_vision and not vision_weights_follow:
        log.warning("no vision checkpoint: the vision tower and projector are untrained; outputs mean little")

    model.requires_grad_(False)
    if train_vision:
        model.vision.requires_grad_(True)
        assert_only_vision_trainable(model)
    else:
        model.eval()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %.1f M parameters, %.1f M trainable", n_all / 1e6, n_train / 1e6)
    return model
