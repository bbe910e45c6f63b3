"""Generate and evaluate with medcap: captioning metrics, VQA-RAD, OmniMedVQA, the field's
benchmarks, or captions / answers for given image files; the whole run in one file.

    medcap run generate --config custom_generation_config \
        test_omnimedvqa=True vqa_type=no_cond_desc seed=1 max_new_tokens=200 top_k=null temperature=0 \
        vision=biomedclip dataset_source=./datasets/ dataset_conversation_style=sharegpt dataset_max_seq_len=500 \
        tokenizer.path=LLAMA/original/tokenizer.model checkpointer.checkpoint_dir=LLAMA \
        vision_checkpoint=RESULTS/NAME/checkpoint/meta_model_last.pt output_dir=RESULTS/NAME

    # single shot: caption images, or answer a question about them
    medcap run generate --config custom_generation_config ... image=a.png,b.png prompt="Is there a fracture?"

Under ``medcap run --nproc_per_node N generate ...`` every suite's questions are shared
out over the N processes (one per device); rank 0 writes exactly the files one process
writes. What only several processes do is marked ``# distributed:`` below.

``backend=vllm`` (from ``.venv-vllm/bin/medcap``, made by ``make vllm``): medcap still
builds every prompt and its embeddings, reads and writes every file; vLLM's server, a
child process started in ``setup`` and stopped in ``cleanup``, does the decoding, over
``tensor_parallel_size`` GPUs. Greedy files are the native engine's, so a run stopped
under one backend finishes under the other.

The run, in the order of this file:

1. ``__init__``: the config, typed and checked (every key, value and file) before
   anything is loaded; the process group; the device (the CPU, with a warning, when
   no GPU is present); the seed.
2. ``setup``: the tokenizer; the model built once in ``dtype`` (Llama weights from
   ``checkpointer``, the trained vision side from ``vision_checkpoint``, everything
   frozen); the generation engine (batches of ``batch_size`` with a KV cache sized to
   each batch, greedy at ``temperature=0``, else top-k sampling with one seeded stream
   per row; ``enable_kv_cache=False`` is the reference's slow path; or vLLM's); the
   image loader; the identity of what the results depend on, recorded beside each
   results file.
3. ``run``: the single-shot mode, then each suite switched on (``test_metrics``,
   ``test_vqarad``, ``test_omnimedvqa``, ``test_slake`` ...), in ``run_suite``:
   a. its items, read from the data set (``suite.read``);
   b. what is on disk (``resume_plan``): a file made by this model and these
      settings is continued where it stopped or reused; one made otherwise is
      refused rather than mixed in (``overwrite=True`` starts it afresh);
   c. the batches still to make, their images loaded (``pending_batches``);
   d. each batch's prompts and generation (``suite.make_rows``), its rows on disk
      before the next batch starts (``plan.write``);
   e. the final file, in item order (``finish``);
   f. the scores, computed from the rows on disk (``suite.score``), and the report.
4. ``cleanup``: vLLM's server stopped (also after an error or Ctrl-C), the process group left.

The files are the reference's, in ``output_dir``; ``ckpt`` in their names is the
vision checkpoint's file name up to its first dot.
"""

import dataclasses
import logging
import os
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from omegaconf import DictConfig
from torchtune import config

from medcap.config import FREE_TEXT, ConfigError, GenerateConfig, from_config, plain, run_recipe, save_resolved
from medcap.eval import (
    BenchmarkSuite,
    CaptionSuite,
    ImageLoader,
    JudgeClient,
    OmniMedVQASuite,
    Ranks,
    SuiteRun,
    VQARADSuite,
    checkpoint_name,
    file_identity,
    finish,
    folder_identity,
    pending_batches,
    read_csv_rows,
    results_lock,
    resume_plan,
)
from medcap.generation import GenerationEngine, VllmEngine, VllmError, prompt_text
from medcap.models import MedcapModel, load_model

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
    """One run: ``GenerateRecipe(cfg)``, ``setup()``, ``run()``, ``cleanup()``."""

    def __init__(self, cfg: Union[DictConfig, GenerateConfig]):
        self.cfg = read_config(cfg)  # unknown keys, bad values and missing files stop here
        self.ranks = self._setup_ranks(self.cfg.device)
        self.device = self._setup_device(self.cfg.device)
        self.seed = self.cfg.seed if self.cfg.seed is not None else 0
        torch.manual_seed(self.seed)
        self.judge = self._setup_judge(self.cfg)  # reached before anything heavy

    def _setup_judge(self, cfg: GenerateConfig) -> Optional[JudgeClient]:
        """The LLM judge of open answers (``judge_endpoint``), checked to answer; None when off."""
        if cfg.judge_endpoint is None:
            return None
        judge = JudgeClient(cfg.judge_endpoint, cfg.judge_model, max_tokens=cfg.judge_max_tokens)
        if self.ranks.rank == 0:
            judge.check()
            log.info("judge: %s at %s", cfg.judge_model, cfg.judge_endpoint)
        return judge

    def _setup_ranks(self, device: str) -> Ranks:
        """distributed: torchrun's processes; each suite's questions are shared out over them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return Ranks()
        if self.cfg.backend == "vllm":
            raise ConfigError("backend=vllm runs one vLLM server, which spreads over GPUs itself "
                              "(tensor_parallel_size=N, or vllm_args=\"--data-parallel-size N\"): run it without --nproc_per_node")
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

    # ---- setup

    def setup(self) -> None:
        cfg = self.cfg
        self.tokenizer = self._setup_tokenizer(cfg.tokenizer)
        self.model = self._setup_model(cfg.model, cfg.checkpointer, cfg.vision_checkpoint)
        self.engine = self._setup_engine(cfg)
        self.image_loader = ImageLoader(self.model.vision.visual.image_size)
        self.ckpt = checkpoint_name(cfg.vision_checkpoint)
        self.identity = self._identity(cfg)

    def _setup_tokenizer(self, cfg_tokenizer: Dict[str, Any]):
        tok = config.instantiate(DictConfig(cfg_tokenizer))
        if getattr(tok, "max_seq_len", None):
            log.info("tokenizer.max_seq_len is ignored at generation: prompts are checked against the model instead")
        return tok

    def _setup_model(self, cfg_model: Dict[str, Any], checkpointer, vision_checkpoint: Optional[str]) -> MedcapModel:
        """The one model loader training uses too: built in dtype on the device, Llama
        weights, the trained vision side, everything frozen."""
        return load_model(
            cfg_model, dataclasses.asdict(checkpointer), device=self.device, dtype=self.cfg.dtype,
            tokenizer=self.tokenizer, vision_checkpoint=vision_checkpoint,
        )

    def _setup_engine(self, cfg: GenerateConfig) -> Union[GenerationEngine, VllmEngine]:
        sampling = dict(batch_size=cfg.batch_size, temperature=float(cfg.temperature or 0.0), top_k=cfg.top_k,
                        seed=self.seed, chunk_size=cfg.chunk_size or 4 * cfg.batch_size)
        if cfg.backend == "vllm":
            # medcap keeps the prompts, embeddings, files and scores; vLLM's server decodes.
            return VllmEngine.start(
                self.model, self.tokenizer, cfg.checkpointer.checkpoint_dir, dtype=cfg.dtype, python=cfg.vllm_python,
                url=cfg.vllm_url, tensor_parallel_size=cfg.tensor_parallel_size,
                extra_args=shlex.split(cfg.vllm_args or ""), **sampling,
            )
        if not cfg.enable_kv_cache:
            log.warning("enable_kv_cache=False: the reference's slow path (one sample at a time, full recompute per token)")
        return GenerationEngine(self.model, self.tokenizer, use_cache=cfg.enable_kv_cache, compile=cfg.compile,
                                **sampling)

    def _identity(self, cfg: GenerateConfig) -> Dict[str, Any]:
        """What the results depend on, recorded beside each results file (and
        fingerprinting the description caches): a change means new rows.

        The backend is part of it only when sampling: vLLM draws from other random streams
        than ours. Greedy rows are the same argmax of the same model's logits under both (the
        vLLM lane checks it file by file), so a greedy run continues under either backend."""
        identity = {
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
        greedy = float(cfg.temperature or 0.0) <= 0 or cfg.top_k == 1
        if cfg.backend != "native" and not greedy:
            identity["backend"] = cfg.backend
        return identity

    # ---- run

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        suite_run = self._suite_run(cfg)
        if cfg.suites() and self.ranks.rank == 0:
            log.info("config as run: %s", save_resolved(cfg, suite_run.output_dir, f"generate-{self.ckpt}.config.yaml"))
        results: Dict[str, Any] = {}
        t0 = time.perf_counter()
        if cfg.image_paths() and self.ranks.rank == 0:
            results["single"] = self.single_shot(cfg.image_paths(), cfg.prompt, cfg.max_new_tokens)
        for name in cfg.suites():
            results[name] = self.run_suite(self._setup_suite(name, suite_run), suite_run)
        if cfg.debug and self.ranks.rank == 0:
            _show_rows(results)
        log.info("done in %.1f s", time.perf_counter() - t0)
        return results

    def _suite_run(self, cfg: GenerateConfig) -> SuiteRun:
        """What every suite of this run shares: where its files go, the model's identity, ..."""
        out, limit = Path(cfg.output_dir), None
        if cfg.debug:
            # A few samples into a separate folder, so a debug run never passes for a real one.
            out, limit = out / "debug", cfg.debug_samples
            log.info("debug: %d samples per suite, files in %s", limit, out)
        return SuiteRun(output_dir=out, ckpt=self.ckpt, image_loader=self.image_loader, identity=self.identity,
                        overwrite=cfg.overwrite, limit=limit, progress=cfg.progress, ranks=self.ranks)

    def _setup_suite(self, name: str, run: SuiteRun):
        cfg = self.cfg
        vqa = dict(dataset_source=str(cfg.dataset_source), vqa_type=cfg.vqa_type, max_seq_len=cfg.dataset_max_seq_len,
                   max_new_tokens=cfg.max_new_tokens)
        if name == "test_metrics":
            return CaptionSuite(run, dataset_source=str(cfg.dataset_source), max_new_tokens=cfg.max_new_tokens)
        if name == "test_vqarad":
            return VQARADSuite(run, **vqa)
        if name == "test_omnimedvqa":
            return OmniMedVQASuite(run, **vqa, test_chunk_idx=cfg.test_chunk_idx, test_chunk=cfg.test_chunk,
                                   scoring=cfg.vqa_scoring, include_modality_key=cfg.omnimedvqa_include_modality_key,
                                   file_order=cfg.omnimedvqa_file_order)
        # the field's benchmarks: SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, your questions
        return BenchmarkSuite(run, name, **vqa, scoring=cfg.vqa_scoring, q_lang=cfg.q_lang, pmcvqa_file=cfg.pmcvqa_file,
                              judge=self.judge, judge_concurrency=cfg.judge_concurrency)

    def run_suite(self, suite, run: SuiteRun) -> Dict[str, Any]:
        """One suite, in the steps every suite takes (3a-f of the module docstring)."""
        engine = self.engine
        items = suite.read()  # a. its questions, from the data set (what was skipped is reported)
        with results_lock(suite.raw_path, run.ranks):  # one writer per results file
            plan = resume_plan(suite, items, run)  # b. what is on disk: continue, reuse, or refuse
            for batch in pending_batches(plan, engine):  # c. the rows still to make, images loaded
                rows = suite.make_rows(engine, batch.items, batch.images)  # d. prompts, generation
                plan.write(batch, rows)  # on disk (fsync'd) before the next batch
            rows = finish(plan)  # e. the final file, in item order
            if run.ranks.rank != 0:  # distributed: rank 0 scores, once every rank's rows are in
                return {"raw_path": str(suite.raw_path), "rows": len(rows), "left_out": plan.left_out}
            result = suite.score(engine, rows, plan.left_out)  # f. scores, from the rows on disk
        suite.report(result)
        return result

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

    # ---- cleanup

    def cleanup(self) -> None:
        """Safe after a failed setup: stops what was started."""
        engine = getattr(self, "engine", None)
        if isinstance(engine, VllmEngine):  # vLLM's server, a child process, stops with the run
            engine.close()
        if self.ranks.world > 1:  # distributed: leave the process group
            import torch.distributed as dist

            dist.destroy_process_group()


def _show_rows(results: Dict[str, Any], n: int = 2) -> None:
    """debug: print the first prompts and outputs of each suite's raw file."""
    for suite, res in results.items():
        path = res.get("raw_path") if isinstance(res, dict) else None
        if not path or not Path(path).exists():
            continue
        for row in read_csv_rows(path)[:n]:
            print(f"[{suite}] prompt:\n{row['instruction']}\n[{suite}] generated: {row['generated']!r} "
                  f"(reference: {row['output']!r})", flush=True)


def main(cfg: DictConfig) -> Dict[str, Any]:
    recipe = GenerateRecipe(cfg)  # every key, value and path checked: nothing is loaded yet
    try:
        recipe.setup()
        return recipe.run()
    finally:
        recipe.cleanup()  # also after an error or Ctrl-C: vLLM's server never outlives the run


def recipe_main(argv: Optional[List[str]] = None) -> int:
    try:
        return run_recipe(main, argv, free_text=FREE_TEXT,
                          on_stop="the results rows made so far are kept: the same command continues from them")
    except VllmError as e:  # vLLM's server did not start or answer: one line, naming its log
        print(f"medcap run: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(recipe_main())
