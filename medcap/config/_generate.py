"""``GenerateConfig``: the generate recipe's config, every key once with its default and meaning.

In order: the suites a run may switch on (``SUITES``) and the keys taken as typed
(``FREE_TEXT``); ``GenerateCheckpointerConfig`` (the ``checkpointer:`` section);
``GenerateConfig``: its keys, ``__post_init__`` (the model sections a config leaves out,
from the vision checkpoint's description), ``suites()`` and ``image_paths()`` (what the run
does), then ``check()``: every component's arguments, every path the run will read, the
judge's keys and the backend's needs (``_check_backend``: vLLM installed, nothing it
cannot do), before anything is loaded.

The YAML files (``custom_generation_config``, ``tiny/generate``, ``demo/generate``)
carry the documented values; ``recipes/generate.py`` and ``medcap serve`` read this
class, built by ``medcap.config.from_config``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Optional

from medcap.config._from_checkpoint import fill_sections, model_mismatch
from medcap.config._reader import ConfigError, check_component, from_config, must_exist

log = logging.getLogger("medcap.config")


# ---- Suites and free-text keys

VQA_TYPE = Literal["no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit"]
SUITES = ("test_metrics", "test_vqarad", "test_omnimedvqa", "test_slake", "test_pathvqa", "test_vqarad_hf", "test_pmcvqa",
          "test_questions")
JUDGED_SUITES = ("test_slake", "test_pathvqa", "test_vqarad_hf", "test_questions")  # judge_endpoint's suites
FREE_TEXT = ("prompt", "image")  # taken exactly as typed on the command line (images=[...] is a YAML list)


# ---- The config

@dataclass
class GenerateCheckpointerConfig:
    """Where the frozen LLM's weights are read from (a Hugging Face folder)."""

    checkpoint_dir: str
    checkpoint_files: Optional[List[str]] = None  # null: every *.safetensors in the folder
    model_type: Literal["LLAMA3"] = "LLAMA3"
    # torchtune's checkpointer keys that the reference's configs carry: medcap reads the
    # weights with torchtune's HF checkpointer itself and writes nothing here.
    LEGACY: ClassVar[Dict[str, Optional[str]]] = {"_component_": None, "output_dir": None, "recipe_checkpoint": None}


@dataclass
class GenerateConfig:
    # model, checkpointer, tokenizer, dtype: null (or a section without _component_) takes them from
    # vision_checkpoint's description of its model (__post_init__); what the config gives wins.
    model: Optional[Dict[str, Any]] = None  # _component_ + arguments: medcap_llama3_1_8b, or medcap_tiny
    checkpointer: Optional[GenerateCheckpointerConfig] = None
    tokenizer: Optional[Dict[str, Any]] = None  # medcap.models.llama3_tokenizer + path (+ special_tokens_path)
    device: str = "cuda"  # falls back to the CPU, with a warning, when no GPU is present
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = None  # null: the checkpoint's (its training dtype), else bf16
    seed: Optional[int] = 1234  # each sampled row draws from its own stream seeded by (seed, row)
    max_new_tokens: int = field(default=300, metadata={"min": 1})  # captions / descriptions
    temperature: float = field(default=0.6, metadata={"min": 0.0})  # 0: greedy
    top_k: Optional[int] = field(default=300, metadata={"min": 1})  # null: the whole vocabulary
    enable_kv_cache: bool = True  # False: the reference's slow path (batch 1, full recompute)
    quantizer: Optional[Dict[str, Any]] = None  # accepted for compatibility; only null works
    batch_size: int = field(default=8, metadata={"min": 1})  # rows decoding together (slots of continuous batching)
    chunk_size: Optional[int] = field(default=None, metadata={"min": 1})  # rows handed to the engine at once, so
    #   finished slots refill from the same call; null: 4 x batch_size. A killed run redoes at most one chunk.
    compile: bool = False  # torch.compile the decode step (CUDA graphs on a GPU); greedy outputs are identical
    # The decoding engine. native: medcap's own. vllm: medcap builds each prompt's embeddings and
    # vLLM's server (a child process) decodes them: `make vllm`, then `.venv-vllm/bin/medcap run ...`.
    backend: Literal["native", "vllm"] = "native"
    tensor_parallel_size: int = field(default=1, metadata={"min": 1})  # vllm: GPUs the LLM is split over
    vllm_python: Optional[str] = None  # vllm: the Python that has vLLM (null: the one running medcap)
    vllm_url: Optional[str] = None  # vllm: a vLLM server already serving the LLM folder (null: start one)
    vllm_args: Optional[str] = None  # vllm: more flags for its server, e.g. "--gpu-memory-utilization 0.8"
    vision: Literal["biomedclip"] = "biomedclip"
    vision_checkpoint: Optional[str] = None  # null: an untrained vision side (files named "untrained")
    output_dir: str = "./results"
    dataset_source: Optional[str] = "./datasets/"  # test_metrics: a sharegpt file; VQA: the folder of the data sets
    dataset_conversation_style: Literal["sharegpt"] = "sharegpt"
    dataset_max_seq_len: int = field(default=500, metadata={"min": 1})  # the description budget's max_seq_len
    test_metrics: bool = False
    test_vqarad: bool = False
    test_omnimedvqa: bool = False
    # the field's benchmarks (read by medcap.eval; layouts in datasets/README.md)
    test_slake: bool = False  # {dataset_source}/Slake1.0/test.json + imgs/
    test_pathvqa: bool = False  # {dataset_source}/path-vqa/data/test-*.parquet (Hugging Face)
    test_vqarad_hf: bool = False  # {dataset_source}/vqa-rad/data/test-*.parquet (Hugging Face)
    test_pmcvqa: bool = False  # {dataset_source}/PMC-VQA/test_2.csv (or test_clean.csv, test.csv) + images/
    test_questions: bool = False  # dataset_source is your own questions' JSONL file
    # The question sets: the defaults are those MedEvalKit's table scores (datasets/README.md)
    q_lang: Literal["en", "zh", "all"] = "all"  # SLAKE's questions: all (MedEvalKit's); en (LLaVA-Med's); zh
    pmcvqa_file: str = "auto"  # auto: PMC-VQA/test_2.csv (MedEvalKit's), else test_clean.csv, else test.csv
    # An LLM judge for open answers (MedEvalKit's tables use one): an OpenAI-compatible server
    judge_endpoint: Optional[str] = None  # its base URL, e.g. http://127.0.0.1:8000/v1 (medcap serve); null: off
    judge_model: Optional[str] = None  # the model name it serves (an API key, if needed: $MEDCAP_JUDGE_API_KEY)
    judge_max_tokens: int = field(default=512, metadata={"min": 1})  # the judge's reply budget
    judge_concurrency: int = field(default=4, metadata={"min": 1})  # requests in flight at once
    vqa_type: VQA_TYPE = "no_cond_desc"
    vqa_scoring: Literal["letter", "loglik"] = "letter"
    test_chunk_idx: Optional[int] = field(default=None, metadata={"min": 0})
    test_chunk: int = field(default=50, metadata={"min": 1})
    omnimedvqa_include_modality_key: bool = False
    omnimedvqa_file_order: Literal["sorted", "listdir"] = "sorted"
    overwrite: bool = False  # start results files made by another model / other settings afresh
    debug: bool = False  # debug_samples items per suite into output_dir/debug
    debug_samples: int = field(default=4, metadata={"min": 1})
    progress: bool = True
    image: Optional[str] = None  # single shot: image=a.png,b.png (paths with commas: images=[...])
    images: Optional[List[str]] = None
    prompt: Optional[str] = None  # single shot: a question (free text); null: caption

    def __post_init__(self) -> None:
        """The model sections the config leaves out, from the vision checkpoint (``_from_checkpoint``)."""
        ckptr = dataclasses.asdict(self.checkpointer) if self.checkpointer else None
        given = {"model": self.model, "tokenizer": self.tokenizer, "checkpointer": ckptr, "dtype": self.dtype}
        filled = fill_sections(given, self.vision_checkpoint)
        if filled == given:  # the config names its model: say so when the checkpoint describes another
            note = model_mismatch(self.model, self.vision_checkpoint)
            if note:
                log.warning(note)
            return
        self.model, self.tokenizer, self.dtype = filled["model"], filled["tokenizer"], filled["dtype"]
        if filled["checkpointer"] != ckptr:
            self.checkpointer = from_config(GenerateCheckpointerConfig, filled["checkpointer"], where="checkpointer.")

    def suites(self) -> List[str]:
        return [s for s in SUITES if getattr(self, s)]

    def image_paths(self) -> List[str]:
        """``image=a.png,b.png`` (split at commas) and ``images=[...]`` (taken whole)."""
        found = [s.strip() for s in (self.image or "").split(",") if s.strip()]
        return found + [str(p) for p in (self.images or [])]

    def check(self) -> None:
        """Everything that can be checked without loading a weight."""
        check_component(self.model, "model")
        check_component(self.tokenizer, "tokenizer")
        if self.quantizer is not None:
            raise ConfigError("quantizer is not supported by medcap's generation (the reference's default, null, is); "
                              "set quantizer=null")
        if not self.suites() and not self.image_paths():
            raise ConfigError(
                "nothing to do: switch on a suite (" + ", ".join(f"{s}=True" for s in SUITES) + ") "
                "or give images for the single-shot mode (image=path1,path2 [prompt=\"question\"])"
            )
        model_vision = self.model.get("vision")
        if model_vision not in (None, self.vision):
            raise ConfigError(f"model.vision={model_vision!r} but vision={self.vision!r}")
        must_exist(self.tokenizer.get("path"), "tokenizer.path")
        if self.tokenizer.get("special_tokens_path"):
            must_exist(self.tokenizer["special_tokens_path"], "tokenizer.special_tokens_path")
        folder = must_exist(self.checkpointer.checkpoint_dir, "checkpointer.checkpoint_dir", "dir")
        for name in self.checkpointer.checkpoint_files or []:
            must_exist(folder / name, f"checkpointer.checkpoint_files ({name})")
        if self.vision_checkpoint:
            must_exist(self.vision_checkpoint, "vision_checkpoint", "path")  # a file, or a folder medcap export wrote
        for p in self.image_paths():
            must_exist(p, "image")
        if self.test_metrics:
            must_exist(self.dataset_source, "dataset_source (test_metrics reads sharegpt records)", "path")
        if self.test_vqarad:
            must_exist(Path(str(self.dataset_source)) / "VQA_RAD" / "VQA_RAD Dataset Public.json",
                       "dataset_source (test_vqarad)")
        if self.test_omnimedvqa:
            must_exist(Path(str(self.dataset_source)) / "OmniMedVQA" / "QA_information" / "Open-access",
                       "dataset_source (test_omnimedvqa)", "dir")
        self._check_benchmarks()
        self._check_backend()

    def _check_benchmarks(self) -> None:
        root = Path(str(self.dataset_source))
        if self.test_slake:
            must_exist(root / "Slake1.0" / "test.json", "dataset_source (test_slake)")
        for suite, folder in (("test_pathvqa", "path-vqa"), ("test_vqarad_hf", "vqa-rad")):
            if getattr(self, suite) and not any((root / folder / "data").glob("test-*.parquet")):
                raise ConfigError(f"dataset_source ({suite}): no test-*.parquet in {str(root / folder / 'data')!r}; "
                                  f"download it with: huggingface-cli download flaviagiammarino/{folder} "
                                  f"--repo-type dataset --local-dir {root / folder}")
        if self.test_pmcvqa:
            names = ("test_2.csv", "test_clean.csv", "test.csv") if self.pmcvqa_file == "auto" else (self.pmcvqa_file,)
            if not any((root / "PMC-VQA" / n).is_file() for n in names):
                must_exist(root / "PMC-VQA" / names[0], f"dataset_source (test_pmcvqa, pmcvqa_file={self.pmcvqa_file}: "
                           + ("test_2.csv, test_clean.csv or test.csv)" if self.pmcvqa_file == "auto" else "that file)"))
        if self.test_questions:
            must_exist(root, "dataset_source (test_questions reads a JSONL file of questions)", "file")
        self._check_judge()

    def _check_judge(self) -> None:
        if self.judge_endpoint is None:
            if self.judge_model is not None:
                raise ConfigError("judge_model is set but judge_endpoint is null: give the judge's URL "
                                  "(judge_endpoint=http://HOST:PORT/v1) or drop judge_model")
            return
        if not str(self.judge_endpoint).startswith(("http://", "https://")):
            raise ConfigError(f"judge_endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                              f"got {self.judge_endpoint!r}")
        if not self.judge_model:
            raise ConfigError("judge_endpoint needs judge_model (the name of the model the endpoint serves)")
        if self.judge_concurrency > 64:
            raise ConfigError(f"judge_concurrency must be <= 64, got {self.judge_concurrency}")
        if not any(getattr(self, s) for s in JUDGED_SUITES):
            raise ConfigError("judge_endpoint judges the open answers of test_slake, test_pathvqa, test_vqarad_hf and "
                              "test_questions; switch one on (test_vqarad is judged by tools/judge.py)")


    def _check_backend(self) -> None:
        """``backend=vllm``'s keys make sense together and vLLM can start; its keys are refused
        with the native engine rather than ignored."""
        vllm_keys = {"tensor_parallel_size": self.tensor_parallel_size != 1, "vllm_python": bool(self.vllm_python),
                     "vllm_url": bool(self.vllm_url), "vllm_args": bool(self.vllm_args)}
        if self.backend == "native":
            given = [k for k, on in vllm_keys.items() if on]
            if given:
                raise ConfigError(f"{given[0]} is a key of backend=vllm (this run has backend=native); for several GPUs "
                                  "with the native engine: medcap run --nproc_per_node N generate ...")
            return
        if self.vqa_scoring == "loglik":
            raise ConfigError("vqa_scoring=loglik scores answers by their likelihood, which vLLM does not give for "
                              "embedded prompts: use backend=native (or vqa_scoring=letter)")
        for key, native_only in (("compile", self.compile), ("enable_kv_cache", not self.enable_kv_cache)):
            if native_only:
                raise ConfigError(f"{key}={getattr(self, key)} is a setting of the native engine; with backend=vllm "
                                  f"vLLM decodes (drop {key}, or use backend=native)")
        if self.vllm_url:
            if not str(self.vllm_url).startswith(("http://", "https://")):
                raise ConfigError(f"vllm_url={self.vllm_url!r} is not an http:// or https:// address")
            return
        why = vllm_missing(self.vllm_python)
        if why:
            raise ConfigError(f"backend=vllm: {why}; run `make vllm`, then `.venv-vllm/bin/medcap run generate ...` "
                              "(or vllm_python=.venv-vllm/bin/python)")


def vllm_missing(python: Optional[str] = None) -> Optional[str]:
    """None when ``python`` (default: this interpreter) can import vLLM, else why not (one
    line). The package is looked up in a child process, not imported (that takes seconds)."""
    py = python or sys.executable
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
        return f"vllm_python={py!r} is not an executable Python interpreter"
    probe = "import importlib.util as u, sys; s = u.find_spec('vllm'); sys.exit(0 if s and s.origin else 3)"
    try:
        done = subprocess.run([py, "-c", probe], capture_output=True, timeout=60, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{py!r} could not be run: {e}"
    return None if done.returncode == 0 else f"vLLM is not installed for {py}"
