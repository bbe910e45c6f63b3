"""``export_model``: a vision checkpoint (and the LLM it belongs to) -> a Hugging Face model folder
that transformers loads alone and medcap reads back.

    resolve_model    the checkpoint's own description (or a config's, for a reference .pt), the model
                     built on the meta device to check the vision weights and the LLM's config against it
    export_model     every file written into a scratch folder next to ``out``, renamed into place at the end
    the files        config.json (model_type medcap, auto_map), the model and processor code (``hf/``),
                     vision.safetensors (a medcap checkpoint: visual.* + projector.*, metadata in its
                     header), tokenizer files + chat template (checked against medcap's prompt ids),
                     preprocessor/processor configs, generation_config.json, README.md, the LLM's
                     licence files; with ``include_llm`` its weight files (hard links where the file
                     system allows) and model.safetensors.index.json over all of them

Without ``include_llm`` the folder points at the base LLM (``base_llm`` in config.json: the local
folder, or a hub name given with ``base_llm=``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from medcap._io import EXPORT_CONFIG, EXPORT_VISION
from medcap.config._from_checkpoint import SECTIONS, fill_sections
from medcap.export._card import base_licence, model_card
from medcap.export._tokenizer import check_prompt_ids, write_tokenizer_files

log = logging.getLogger("medcap.export")

CODE_DIR = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_medcap.py", "modeling_medcap.py", "processing_medcap.py")
INDEX = "model.safetensors.index.json"
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DROP_FROM_LLM_CONFIG = ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path",
                         "torch_dtype", "dtype")


# ---- Which model


def _config_sections(config: str, overrides: Sequence[str], llm: Optional[str]) -> Dict[str, Any]:
    """The model sections of a generation config (for a checkpoint that records none)."""
    from omegaconf import OmegaConf

    from medcap._registry import resolve_config

    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(config)), OmegaConf.from_dotlist(list(overrides)))
    data = OmegaConf.to_container(cfg, resolve=True)
    out = {k: data.get(k) for k in SECTIONS}
    if llm:
        out["checkpointer"] = {"checkpoint_dir": llm, "checkpoint_files": None, "model_type": "LLAMA3"}
        out["tokenizer"] = dict(out["tokenizer"] or {}, path=os.path.join(llm, "original", "tokenizer.model"))
        special = os.path.join(llm, "original", "special_tokens.json")
        if os.path.isfile(special):
            out["tokenizer"]["special_tokens_path"] = special
    return out


def _check_llm_config(model: Any, hf: Dict[str, Any], llm_dir: str) -> None:
    emb = model.tok_embeddings  # the fusion model holds the decoder's embedding itself
    ours = {"vocab_size": emb.num_embeddings, "hidden_size": emb.embedding_dim,
            "num_hidden_layers": len(model.decoder.layers)}
    differ = [f"{k}: config.json {hf.get(k)}, model {v}" for k, v in ours.items() if hf.get(k) != v]
    if differ:
        raise ValueError(f"the LLM folder {llm_dir!r} is not the model's LLM ({'; '.join(differ)})")


def _check_vision_fits(model: Any, state: Dict[str, Dict[str, Any]], checkpoint: str) -> None:
    problems = []
    for part in ("visual", "projector"):
        own = {k: tuple(v.shape) for k, v in getattr(model.vision, part).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state[part].items()}
        problems += [f"{part}.{k}: checkpoint {theirs.get(k)}, model {own.get(k)}"
                     for k in sorted(set(own) | set(theirs)) if own.get(k) != theirs.get(k)]
    if problems:
        raise ValueError(f"vision checkpoint {checkpoint!r} does not fit the model: " + "; ".join(problems[:6]))


def resolve_model(checkpoint: str, *, config: Optional[str] = None, overrides: Sequence[str] = (),
                  llm: Optional[str] = None) -> Dict[str, Any]:
    """Everything the folder is written from: ``sections``, ``meta`` (the checkpoint's metadata with a
    fresh description), ``state`` (the vision tensors), ``tokenizer``, ``hf_config``, ``model`` (meta)."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from medcap.models import load_vision_checkpoint, resolve_dtype
    from medcap.models._load import build_model, check_tokenizer
    from medcap.training import describe_model

    if config:
        sections = _config_sections(config, overrides, llm)
    else:
        given = {k: None for k in SECTIONS}
        if llm:
            given["checkpointer"] = {"checkpoint_dir": llm}
        sections = fill_sections(given, checkpoint)
    sections["dtype"] = sections.get("dtype") or "bf16"
    model = build_model(sections["model"], device="meta", dtype=resolve_dtype(sections["dtype"]), skip_pretrained=True)
    state, meta = load_vision_checkpoint(checkpoint)
    _check_vision_fits(model, state, checkpoint)
    tokenizer = tt_config.instantiate(OmegaConf.create(sections["tokenizer"]))
    check_tokenizer(tokenizer, model)
    llm_dir = str(sections["checkpointer"]["checkpoint_dir"])
    config_json = Path(llm_dir) / "config.json"
    if not config_json.is_file():
        raise FileNotFoundError(f"{str(config_json)!r} is missing: the LLM folder needs its config.json")
    hf_config = json.loads(config_json.read_text(encoding="utf-8"))
    _check_llm_config(model, hf_config, llm_dir)
    desc = describe_model(model, model_cfg=sections["model"], checkpointer=sections["checkpointer"],
                          tokenizer=sections["tokenizer"], dtype=sections["dtype"], training=meta.get("training"))
    kept = {k: v for k, v in meta.items() if k not in ("path", "checkpoint_format", "export", "export_dir")}
    return {"sections": sections, "meta": {**kept, **desc}, "state": state, "tokenizer": tokenizer,
            "hf_config": hf_config, "model": model, "checkpoint": str(checkpoint)}


# ---- The files


def _hf_config(plan: Dict[str, Any], *, base_llm: str, llm_files: Optional[List[str]]) -> Dict[str, Any]:
    meta, tok, model = plan["meta"], plan["tokenizer"], plan["model"]
    out = {k: v for k, v in plan["hf_config"].items() if k not in _DROP_FROM_LLM_CONFIG}
    out.update({
        "model_type": "medcap", "architectures": ["MedcapForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_medcap.MedcapConfig",
                     "AutoModelForCausalLM": "modeling_medcap.MedcapForCausalLM",
                     "AutoProcessor": "processing_medcap.MedcapProcessor"},
        "vision_tower": meta["vision_tower"], "projector_hidden_dim": int(model.vision.projector[0].out_features),
        "num_image_tokens": meta["num_image_tokens"], "image_token_id": meta["image_token_id"],
        "image_size": meta["image_transform"]["size"], "vision_weights": EXPORT_VISION,
        "base_llm": base_llm, "llm_included": llm_files is not None, "llm_files": llm_files,
        "dtype": _TORCH_DTYPES[meta["dtype"]],
        "bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_tokens), "pad_token_id": tok.pad_id,
        "medcap": {k: meta.get(k) for k in ("medcap_version", "recipe", "global_step", "epoch", "created_at",
                                            "model", "training")},
    })
    return out


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _processor_files(tmp: Path, plan: Dict[str, Any], max_new_tokens: int) -> None:
    meta, tok = plan["meta"], plan["tokenizer"]
    t = meta["image_transform"]
    auto = {"AutoImageProcessor": "processing_medcap.MedcapImageProcessor",
            "AutoProcessor": "processing_medcap.MedcapProcessor"}
    _write_json(tmp / "preprocessor_config.json", {
        "image_processor_type": "MedcapImageProcessor", "processor_class": "MedcapProcessor",
        "image_size": t["size"], "image_mean": t["mean"], "image_std": t["std"], "auto_map": auto})
    _write_json(tmp / "processor_config.json", {
        "processor_class": "MedcapProcessor", "num_image_tokens": meta["num_image_tokens"],
        "auto_map": {"AutoProcessor": auto["AutoProcessor"]}})
    _write_json(tmp / "generation_config.json", {
        "bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_tokens), "pad_token_id": tok.pad_id,
        "do_sample": False, "max_new_tokens": int(max_new_tokens)})


def _safetensors_keys(path: Path) -> Dict[str, int]:
    """{tensor name: bytes} from a safetensors header (no tensor read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)
        return "copied"


def _include_llm(tmp: Path, llm_dir: str, files: Optional[List[str]]) -> List[str]:
    """The LLM's weight files into the folder, and one index over them and the vision file. A single
    ``model.safetensors`` is renamed: transformers would read that file alone and skip the index."""
    folder = Path(llm_dir)
    names = list(files) if isinstance(files, list) and files else sorted(p.name for p in folder.glob("*.safetensors"))
    if EXPORT_VISION in names:
        raise ValueError(f"the LLM folder {llm_dir!r} holds a file named {EXPORT_VISION}, which the export needs")
    weight_map: Dict[str, str] = {}
    total = 0
    written = []
    for name in names:
        target = "llm.safetensors" if name == "model.safetensors" else name
        how = _link_or_copy(folder / name, tmp / target)
        log.info("LLM weights %s %s as %s", name, how, target)
        written.append(target)
        for key, size in _safetensors_keys(tmp / target).items():
            weight_map[key], total = target, total + size
    for key, size in _safetensors_keys(tmp / EXPORT_VISION).items():
        weight_map[key], total = EXPORT_VISION, total + size
    _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return written


def _vision_file(tmp: Path, plan: Dict[str, Any], info: Dict[str, Any]) -> None:
    from medcap.models import save_vision_checkpoint

    save_vision_checkpoint(plan["state"], tmp / EXPORT_VISION, metadata={**plan["meta"], "exported": info})
    (tmp / EXPORT_VISION).with_suffix(".json").unlink(missing_ok=True)  # the header holds it; config.json tells people


# ---- The export


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{str(out)!r} exists and is not empty: give another --out, or --force to replace it")


def export_model(checkpoint: str, out: str, *, include_llm: bool = False, results: Optional[Sequence[str]] = None,
                 config: Optional[str] = None, overrides: Sequence[str] = (), llm: Optional[str] = None,
                 base_llm: Optional[str] = None, max_new_tokens: int = 300, force: bool = False) -> Path:
    """Write the model folder ``out``; returns its path. Nothing is left half-written: the files go
    into a scratch folder beside ``out``, renamed into place once complete."""
    from medcap.models._vision_checkpoint import _medcap_version

    out = Path(out)
    _check_out(out, force)
    plan = resolve_model(str(checkpoint), config=config, overrides=overrides, llm=llm)
    llm_dir = str(Path(plan["sections"]["checkpointer"]["checkpoint_dir"]).resolve())
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = {"from": str(Path(checkpoint).resolve()), "by": f"medcap {_medcap_version()}",
                "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        _write_folder(tmp, plan, info, llm_dir=llm_dir, include_llm=include_llm, results=results,
                      base_llm=base_llm or llm_dir, max_new_tokens=max_new_tokens, name=out.name)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_folder(tmp: Path, plan: Dict[str, Any], info: Dict[str, Any], *, llm_dir: str, include_llm: bool,
                  results: Optional[Sequence[str]], base_llm: str, max_new_tokens: int, name: str) -> None:
    meta = plan["meta"]
    for code in CODE_FILES:
        shutil.copyfile(CODE_DIR / code, tmp / code)
    _vision_file(tmp, plan, info)
    files = plan["sections"]["checkpointer"].get("checkpoint_files")
    llm_files = _include_llm(tmp, llm_dir, files) if include_llm else None
    _write_json(tmp / EXPORT_CONFIG, _hf_config(plan, base_llm=base_llm, llm_files=llm_files))
    _processor_files(tmp, plan, max_new_tokens)
    paths = {k: str(v) for k, v in plan["sections"]["tokenizer"].items() if k in ("path", "special_tokens_path") and v}
    write_tokenizer_files(tmp, plan["tokenizer"], paths, num_image_tokens=meta["num_image_tokens"],
                          max_length=int(plan["model"].decoder.max_seq_len))
    log.info("tokenizer checked: %d prompts give medcap's ids", check_prompt_ids(tmp, plan["tokenizer"],
                                                                                 meta["num_image_tokens"]))
    licence, licence_files = base_licence(llm_dir)
    for f in licence_files:
        shutil.copyfile(f, tmp / f.name)
    (tmp / "README.md").write_text(model_card(meta, name=name, base_llm=base_llm, llm_included=include_llm,
                                              results=results, licence=licence, folder=name), encoding="utf-8")
