"""Generation and evaluation with medcap: captioning metrics, VQA-RAD, OmniMedVQA,
or captions / answers for given image files.

    medcap run generate --config custom_generation_config \
        test_omnimedvqa=True vqa_type=no_cond_desc seed=1 max_new_tokens=200 top_k=null temperature=0 \
        vision=biomedclip dataset_source=./datasets/ dataset_conversation_style=sharegpt dataset_max_seq_len=500 \
        tokenizer.path=LLAMA/original/tokenizer.model checkpointer.checkpoint_dir=LLAMA \
        vision_checkpoint=RESULTS/NAME/checkpoint/meta_model_last.pt output_dir=RESULTS/NAME

    # single shot: caption images, or answer a question about them
    medcap run generate --config custom_generation_config ... image=a.png,b.png prompt="Is there a fracture?"

What it does (the logic lives in ``medcap.generation`` and ``medcap.eval``):

* builds ``cfg.model`` in ``cfg.dtype`` on ``cfg.device`` (the CPU, with a
  warning, when no GPU is present), loads the Llama weights named by
  ``cfg.checkpointer`` and the vision side from ``vision_checkpoint``; nothing
  trains;
* generates in batches of ``batch_size`` with a KV cache sized to each batch
  (``enable_kv_cache=False`` takes the reference's slow path: one sample at a
  time, no cache); greedy when ``temperature=0`` (or ``top_k=1``), otherwise
  top-k sampling with one seeded random stream per row;
* runs each suite switched on (``test_metrics``, ``test_vqarad``,
  ``test_omnimedvqa``) and writes the reference's files into ``output_dir``;
  rows are on disk as soon as they are made, and a stopped run continues where
  it stopped when started again with the same command.

``ckpt`` in the file names is the vision checkpoint's file name up to its first
dot, as in the reference. Each results file records what made it (the vision
checkpoint, the LLM folder, the settings that change outputs) in a
``.run.json`` beside it: a restart with another model or other settings is
refused rather than mixed in; ``overwrite=True`` starts those files afresh.
"""

import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, training

from medcap.checkpointing import load_llama_weights, load_vision_weights
from medcap.eval import (
    SCORING_METHODS,
    ImageLoader,
    check_vqa_type,
    checkpoint_name,
    run_test_metrics,
    run_test_omnimedvqa,
    run_test_vqarad,
)
from medcap.eval._datasets import FILE_ORDERS
from medcap.eval._loop import file_identity, folder_identity
from medcap.generation import GenerationEngine, prompt_text
from medcap.models import MedcapModel, check_vision

log = logging.getLogger("medcap.generate")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
SUITES = ("test_metrics", "test_vqarad", "test_omnimedvqa")


class GenerateRecipe:
    """Build the model once, then run the suites (or the single-shot mode) the config asks for."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self._check_config(cfg)
        self.device = self._setup_device(cfg.get("device", "cuda"))
        self.dtype = DTYPES[cfg.get("dtype", "bf16")]
        seed = cfg.get("seed")
        self.seed = int(seed) if seed is not None else 0
        torch.manual_seed(self.seed)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_config(cfg: DictConfig) -> None:
        check_vision(cfg.get("vision", "biomedclip"))
        if cfg.get("dtype", "bf16") not in DTYPES:
            raise ValueError(f"dtype={cfg.get('dtype')!r}; choose one of {list(DTYPES)}")
        if cfg.get("quantizer") is not None:
            raise ValueError(
                "quantizer is not supported by medcap's generation (the reference's default, null, is); "
                "set quantizer=null"
            )
        style = cfg.get("dataset_conversation_style", "sharegpt")
        if style != "sharegpt":
            raise ValueError(f"dataset_conversation_style={style!r}: medcap reads sharegpt data only")
        if any(cfg.get(s, False) for s in ("test_vqarad", "test_omnimedvqa")):
            check_vqa_type(cfg.get("vqa_type", "no_cond_desc"))
        if cfg.get("omnimedvqa_file_order", "sorted") not in FILE_ORDERS:
            raise ValueError(f"omnimedvqa_file_order={cfg.get('omnimedvqa_file_order')!r}; choose one of {list(FILE_ORDERS)}")
        if cfg.get("vqa_scoring", "letter") not in SCORING_METHODS:
            raise ValueError(f"vqa_scoring={cfg.get('vqa_scoring')!r}; choose one of {list(SCORING_METHODS)}")
        for key in ("batch_size", "max_new_tokens", "dataset_max_seq_len", "test_chunk"):
            v = cfg.get(key)
            if v is not None and int(v) < 1:
                raise ValueError(f"{key} must be >= 1, got {v}")
        temperature = cfg.get("temperature", 0.0)
        if temperature is not None and float(temperature) < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_k = cfg.get("top_k")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {top_k}")
        if not any(cfg.get(s, False) for s in SUITES) and not _images_of(cfg):
            raise ValueError(
                "nothing to do: switch on a suite (test_metrics=True, test_vqarad=True or test_omnimedvqa=True) "
                "or give images for the single-shot mode (image=path1,path2 [prompt=\"question\"])"
            )

    @staticmethod
    def _setup_device(name: str) -> torch.device:
        if str(name).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s but no CUDA device is available: running on the CPU (slow for the 8B model)", name)
            return torch.device("cpu")
        return torch.device(name)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.tokenizer = self._setup_tokenizer(cfg.tokenizer)
        self.model = self._setup_model(cfg.model, cfg.checkpointer, cfg.get("vision_checkpoint"))
        self.engine = self._setup_engine(cfg)
        self.image_loader = ImageLoader(self.model.vision.visual.image_size)
        self.ckpt = checkpoint_name(cfg.get("vision_checkpoint"))
        self.identity = self._identity(cfg)

    def _identity(self, cfg: DictConfig) -> Dict[str, Any]:
        """What the results depend on, recorded beside each results file (and
        fingerprinting the description caches): a change means new rows."""
        vc = cfg.get("vision_checkpoint")
        files = cfg.checkpointer.get("checkpoint_files")
        if isinstance(files, (ListConfig, DictConfig)):
            files = OmegaConf.to_container(files, resolve=True)
        return {
            "vision_checkpoint": file_identity(vc) if vc else None,
            "llm": folder_identity(cfg.checkpointer.checkpoint_dir, files if isinstance(files, list) else None),
            "model": str(cfg.model.get("_component_", "")),
            "dtype": str(cfg.get("dtype", "bf16")),
            "temperature": float(cfg.get("temperature") or 0.0),
            "top_k": None if cfg.get("top_k") is None else int(cfg.get("top_k")),
            "seed": self.seed,
            "dataset_max_seq_len": int(cfg.get("dataset_max_seq_len") or 500),
            "max_new_tokens": int(cfg.get("max_new_tokens", 300)),
        }

    def _setup_tokenizer(self, cfg_tokenizer: DictConfig):
        tok = config.instantiate(cfg_tokenizer)
        if getattr(tok, "max_seq_len", None):
            log.info("tokenizer.max_seq_len is ignored at generation: prompts are checked against the model instead")
        return tok

    def _setup_model(self, cfg_model: DictConfig, cfg_checkpointer: DictConfig, vision_checkpoint: Optional[str]) -> MedcapModel:
        overrides: Dict[str, Any] = {}
        if vision_checkpoint and cfg_model.get("vision_pretrained"):
            overrides["vision_pretrained"] = None  # overwritten by the checkpoint at once
        with training.set_default_dtype(self.dtype), self.device:
            model = config.instantiate(cfg_model, **overrides)
        if not isinstance(model, MedcapModel):
            raise TypeError(f"model._component_ built a {type(model).__name__}, not a MedcapModel")
        if model.image_token_id != self.tokenizer.image_id:
            raise ValueError(
                f"the tokenizer's image id ({self.tokenizer.image_id}) is not the model's image_token_id "
                f"({model.image_token_id}): tokenizer and model do not belong together"
            )
        files = cfg_checkpointer.get("checkpoint_files")
        if isinstance(files, (ListConfig, DictConfig)):
            files = OmegaConf.to_container(files, resolve=True)
        load_llama_weights(
            model, cfg_checkpointer.checkpoint_dir, checkpoint_files=files,
            model_type=cfg_checkpointer.get("model_type", "LLAMA3"),
        )
        if vision_checkpoint:
            load_vision_weights(model, vision_checkpoint)
            log.info("vision tower and projector loaded from %s", vision_checkpoint)
        else:
            log.warning("no vision_checkpoint: the vision tower and projector are untrained; outputs mean little")
        model.requires_grad_(False)
        model.eval()
        return model

    def _setup_engine(self, cfg: DictConfig) -> GenerationEngine:
        use_cache = bool(cfg.get("enable_kv_cache", True))
        if not use_cache:
            log.warning("enable_kv_cache=False: the reference's slow path (one sample at a time, full recompute per token)")
        return GenerationEngine(
            self.model, self.tokenizer,
            batch_size=int(cfg.get("batch_size", 8)),
            temperature=float(cfg.get("temperature") or 0.0),
            top_k=cfg.get("top_k"),
            seed=self.seed,
            use_cache=use_cache,
        )

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        debug = bool(cfg.get("debug", False))
        out = Path(cfg.get("output_dir", "."))
        limit = None
        if debug:
            # A few samples into a separate folder, so a debug run never passes for a real one.
            out = out / "debug"
            limit = int(cfg.get("debug_samples", 4))
            log.info("debug: %d samples per suite, files in %s", limit, out)
        common = dict(
            output_dir=out, ckpt=self.ckpt, image_loader=self.image_loader, limit=limit,
            progress=bool(cfg.get("progress", True)), identity=self.identity,
            overwrite=bool(cfg.get("overwrite", False)),
        )
        max_new = int(cfg.get("max_new_tokens", 300))
        max_seq_len = int(cfg.get("dataset_max_seq_len") or 500)
        results: Dict[str, Any] = {}
        t0 = time.perf_counter()
        if _images_of(cfg):
            results["single"] = self.single_shot(_images_of(cfg), cfg.get("prompt"), max_new)
        if cfg.get("test_metrics", False):
            results["test_metrics"] = run_test_metrics(
                self.engine, dataset_source=str(cfg.dataset_source), max_new_tokens=max_new, **common
            )
        if cfg.get("test_vqarad", False):
            results["test_vqarad"] = run_test_vqarad(
                self.engine, dataset_source=str(cfg.dataset_source), vqa_type=cfg.get("vqa_type", "no_cond_desc"),
                max_seq_len=max_seq_len, max_new_tokens=max_new, **common,
            )
        if cfg.get("test_omnimedvqa", False):
            idx = cfg.get("test_chunk_idx")
            results["test_omnimedvqa"] = run_test_omnimedvqa(
                self.engine, dataset_source=str(cfg.dataset_source), vqa_type=cfg.get("vqa_type", "no_cond_desc"),
                max_seq_len=max_seq_len, max_new_tokens=max_new,
                test_chunk_idx=None if idx is None else int(idx), test_chunk=int(cfg.get("test_chunk", 50)),
                scoring=cfg.get("vqa_scoring", "letter"),
                include_modality_key=bool(cfg.get("omnimedvqa_include_modality_key", False)),
                file_order=str(cfg.get("omnimedvqa_file_order", "sorted")), **common,
            )
        if debug:
            _show_rows(results)
        log.info("done in %.1f s", time.perf_counter() - t0)
        return results

    def single_shot(self, images: List[str], prompt: Optional[str], max_new_tokens: int) -> List[Dict[str, str]]:
        """Caption each image (no prompt) or answer ``prompt`` about it; printed and returned."""
        tensors = [self.image_loader(p) for p in images]  # a bad file fails here, with its reason
        tokens = self.engine.prompt(prompt or None, has_image=True)
        texts = self.engine.generate_texts(
            [tokens] * len(images), tensors, max_new_tokens, [f"single:{p}" for p in images]
        )
        if self.cfg.get("debug", False):
            print(prompt_text(self.tokenizer, tokens))
        out = []
        for p, t in zip(images, texts):
            print(f"{p}: {t}", flush=True)
            out.append({"image": p, "prompt": prompt or "", "generated": t})
        return out


def _show_rows(results: Dict[str, Any], n: int = 2) -> None:
    """debug: print the first prompts and outputs of each suite's raw file."""
    from medcap.eval import read_csv_rows

    for suite, res in results.items():
        path = res.get("raw_path") if isinstance(res, dict) else None
        if not path or not Path(path).exists():
            continue
        for row in read_csv_rows(path)[:n]:
            print(f"[{suite}] prompt:\n{row['instruction']}\n[{suite}] generated: {row['generated']!r} "
                  f"(reference: {row['output']!r})", flush=True)


def _images_of(cfg: DictConfig) -> List[str]:
    """``image=a.png,b.png`` or ``images=[a.png, b.png]`` -> paths."""
    found: List[str] = []
    for key in ("image", "images"):
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, (ListConfig, list, tuple)):
            found += [str(x) for x in v]
        else:
            found += [s.strip() for s in str(v).split(",") if s.strip()]
    return found


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = GenerateRecipe(cfg)
    recipe.setup()
    recipe.run()


if __name__ == "__main__":
    sys.exit(recipe_main())
