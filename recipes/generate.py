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

import dataclasses
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from omegaconf import DictConfig
from torchtune import config

from medcap.config import FREE_TEXT, GenerateConfig, from_config, plain, run_recipe, save_resolved
from medcap.eval import ImageLoader, checkpoint_name, run_test_metrics, run_test_omnimedvqa, run_test_vqarad
from medcap.eval._benchmarks import BENCHMARKS, run_benchmark
from medcap.eval._loop import Ranks, file_identity, folder_identity
from medcap.generation import GenerationEngine, prompt_text
from medcap.models import MedcapModel, load_model
from medcap.models import resolve_dtype

log = logging.getLogger("medcap.generate")


def read_config(cfg: Union[DictConfig, GenerateConfig]) -> GenerateConfig:
    """The YAML + overrides as a checked ``GenerateConfig``: every key, value and path
    the run will read, before anything is loaded."""
    if isinstance(cfg, GenerateConfig):
        conf = cfg
    else:
        data, variables = plain(cfg)
        conf = from_config(GenerateConfig, data, variables=variables)
    conf.check()
    return conf


class GenerateRecipe:
    """Build the model once, then run the suites (or the single-shot mode) the config asks for."""

    def __init__(self, cfg: Union[DictConfig, GenerateConfig]):
        self.cfg = read_config(cfg)
        self.ranks = self._setup_ranks(self.cfg.device)
        self.device = self._setup_device(self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype)
        self.seed = self.cfg.seed if self.cfg.seed is not None else 0
        torch.manual_seed(self.seed)

    @staticmethod
    def _setup_ranks(device: str) -> Ranks:
        """Under torchrun (``medcap run --nproc_per_node N generate ...``) every suite's
        questions are shared out over the N processes, one per device; the files are
        exactly those one process writes."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return Ranks()
        import torch.distributed as dist

        gpu = str(device).startswith("cuda") and torch.cuda.is_available()
        # Ranks wait for each other only at a suite's start and end: allow a long wait.
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(hours=48))
        rank = dist.get_rank()
        if rank != 0:
            logging.getLogger().setLevel(logging.WARNING)  # one process reports
        return Ranks(rank=rank, world=world, barrier=dist.barrier)

    def _setup_device(self, name: str) -> torch.device:
        if str(name).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s but no CUDA device is available: running on the CPU (slow for the 8B model)", name)
            return torch.device("cpu")
        if str(name) == "cuda" and self.ranks.world > 1:
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device(name)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.tokenizer = self._setup_tokenizer(cfg.tokenizer)
        self.model = self._setup_model(cfg.model, cfg.checkpointer, cfg.vision_checkpoint)
        self.engine = self._setup_engine(cfg)
        self.image_loader = ImageLoader(self.model.vision.visual.image_size)
        self.ckpt = checkpoint_name(cfg.vision_checkpoint)
        self.identity = self._identity(cfg)

    def _identity(self, cfg: GenerateConfig) -> Dict[str, Any]:
        """What the results depend on, recorded beside each results file (and
        fingerprinting the description caches): a change means new rows."""
        return {
            "vision_checkpoint": file_identity(cfg.vision_checkpoint) if cfg.vision_checkpoint else None,
            "llm": folder_identity(cfg.checkpointer.checkpoint_dir, cfg.checkpointer.checkpoint_files),
            "model": str(cfg.model.get("_component_", "")),
            "dtype": cfg.dtype,
            "temperature": float(cfg.temperature or 0.0),
            "top_k": cfg.top_k,
            "seed": self.seed,
            "dataset_max_seq_len": cfg.dataset_max_seq_len,
            "max_new_tokens": cfg.max_new_tokens,
        }

    def _setup_tokenizer(self, cfg_tokenizer: Dict[str, Any]):
        tok = config.instantiate(DictConfig(cfg_tokenizer))
        if getattr(tok, "max_seq_len", None):
            log.info("tokenizer.max_seq_len is ignored at generation: prompts are checked against the model instead")
        return tok

    def _setup_model(self, cfg_model: Dict[str, Any], checkpointer, vision_checkpoint: Optional[str]) -> MedcapModel:
        """The one model loader training uses too: built in dtype on the device, Llama
        weights, the trained vision side, everything frozen."""
        return load_model(
            cfg_model, dataclasses.asdict(checkpointer), device=self.device, dtype=self.dtype,
            tokenizer=self.tokenizer, vision_checkpoint=vision_checkpoint,
        )

    def _setup_engine(self, cfg: GenerateConfig) -> GenerationEngine:
        if not cfg.enable_kv_cache:
            log.warning("enable_kv_cache=False: the reference's slow path (one sample at a time, full recompute per token)")
        return GenerationEngine(
            self.model, self.tokenizer, batch_size=cfg.batch_size, temperature=float(cfg.temperature or 0.0),
            top_k=cfg.top_k, seed=self.seed, use_cache=cfg.enable_kv_cache, compile=cfg.compile,
            chunk_size=cfg.chunk_size or 4 * cfg.batch_size,
        )

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        out = Path(cfg.output_dir)
        limit = None
        if cfg.debug:
            # A few samples into a separate folder, so a debug run never passes for a real one.
            out = out / "debug"
            limit = cfg.debug_samples
            log.info("debug: %d samples per suite, files in %s", limit, out)
        if cfg.suites() and self.ranks.rank == 0:
            log.info("config as run: %s", save_resolved(cfg, out, f"generate-{self.ckpt}.config.yaml"))
        common = dict(
            output_dir=out, ckpt=self.ckpt, image_loader=self.image_loader, limit=limit,
            progress=cfg.progress, identity=self.identity, overwrite=cfg.overwrite, ranks=self.ranks,
        )
        results: Dict[str, Any] = {}
        t0 = time.perf_counter()
        if cfg.image_paths() and self.ranks.rank == 0:
            results["single"] = self.single_shot(cfg.image_paths(), cfg.prompt, cfg.max_new_tokens)
        if cfg.test_metrics:
            results["test_metrics"] = run_test_metrics(
                self.engine, dataset_source=str(cfg.dataset_source), max_new_tokens=cfg.max_new_tokens, **common
            )
        vqa = dict(dataset_source=str(cfg.dataset_source), vqa_type=cfg.vqa_type, max_seq_len=cfg.dataset_max_seq_len,
                   max_new_tokens=cfg.max_new_tokens)
        if cfg.test_vqarad:
            results["test_vqarad"] = run_test_vqarad(self.engine, **vqa, **common)
        if cfg.test_omnimedvqa:
            results["test_omnimedvqa"] = run_test_omnimedvqa(
                self.engine, **vqa, test_chunk_idx=cfg.test_chunk_idx, test_chunk=cfg.test_chunk,
                scoring=cfg.vqa_scoring, include_modality_key=cfg.omnimedvqa_include_modality_key,
                file_order=cfg.omnimedvqa_file_order, **common,
            )
        for suite in BENCHMARKS:  # the field's benchmarks: SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, your questions
            if getattr(cfg, suite):
                results[suite] = run_benchmark(self.engine, suite, **vqa, scoring=cfg.vqa_scoring, q_lang=cfg.q_lang,
                                               **common)
        if cfg.debug and self.ranks.rank == 0:
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
        if self.cfg.debug:
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


def main(cfg: DictConfig) -> Dict[str, Any]:
    recipe = GenerateRecipe(cfg)  # every key, value and path checked: nothing is loaded yet
    recipe.setup()
    try:
        return recipe.run()
    finally:
        if recipe.ranks.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def recipe_main(argv: Optional[List[str]] = None) -> int:
    return run_recipe(main, argv, free_text=FREE_TEXT)


if __name__ == "__main__":
    sys.exit(recipe_main())
