"""The demo's stages, run in order: each one's command line, and the bookkeeping that skips
what already finished.

    Demo.commands        every stage's command (``medcap run ...`` or ``medcap demo --stage ...``)
    Demo.run             the stages in order; one whose fingerprint (its settings and every
                         earlier stage's) matches its marker in ``stages/`` is skipped
    Demo._stage_*        world, tokenizer, lm (in this process: ``_world``, ``_bpe``, ``_lm``);
                         train and the four evaluations (medcap's own recipes, each a child
                         process whose output is also kept in ``logs/``); report (``_report``)

A stopped demo continues where it stopped; training resumes from its last saved state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from medcap._io import atomic_write
from medcap.demo._settings import CHECKPOINT, RECIPE_STAGES, STAGES, TARGET_MARGINS, DemoSettings


# ---- helpers


def _auto_threads() -> int:
    """Torch threads for this machine: at most half its cores and only the idle ones.
    The demo's models are tiny, so a second thread gains little; and when another job
    takes a core, threads that keep waiting for each other are several times slower
    than one (measured on 2 shared cores: vision training 0.8 steps/s on 2 threads
    against 3 on 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    free = int(cores - load + 0.5)
    return max(1, min(cores // 2, free, 8))


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children: against
    the wall time it tells how long the stages waited for a CPU on a shared machine."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, ensure_ascii=False, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def say(msg: str) -> None:
    print(f"[medcap demo] {msg}", flush=True)


def _tee(cmd: List[str], log_path: Path, env: Dict[str, str]) -> int:
    """Run ``cmd``, showing its output live and keeping a copy in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        out = getattr(sys.stdout, "buffer", None)
        try:
            while True:
                chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
                if not chunk:
                    break
                log.write(chunk)
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:  # a captured stdout (tests): text only
                    sys.stdout.write(chunk.decode(errors="replace"))
        except KeyboardInterrupt:
            proc.wait()
            raise
        return proc.wait()


# ---- the demo


@dataclass
class Demo:
    """One demo folder and its settings: every stage's command, and the stages run in order."""

    out: Path
    settings: DemoSettings
    force: bool = False
    only: Optional[str] = None
    quick: bool = False
    start: Optional[str] = None  # redo this stage and every later one
    overrides: Dict[str, List[str]] = field(default_factory=dict)  # extra key=value per recipe stage

    def __post_init__(self):
        self.out = Path(self.out).absolute()
        self.threads = self.settings.threads or _auto_threads()
        self.world = self.out / "world"
        self.llm = self.out / "llm"
        self.train_dir = self.out / "train"
        self.stage_dir = self.out / "stages"
        self.log_dir = self.out / "logs"
        self.seconds: Dict[str, float] = {}
        self._may_resume = False
        self._stage_t0 = time.perf_counter()

    # ---- stage bookkeeping

    def _stage_settings(self, stage: str) -> Dict[str, Any]:
        s = asdict(self.settings)
        s.pop("threads")  # speed, not results
        keys = {
            "world": ["seed", "n_train", "n_test", "questions_per_image", "image_size", "num_image_tokens",
                      "shuffle_options", "held_out_per_modality"],
            "tokenizer": ["bpe_merges"],
            "lm": ["seed", "lm_layers", "lm_dim", "lm_steps", "lm_batch_size", "lm_lr", "shuffle_options"],
            "train": ["train_epochs", "train_max_steps_per_epoch"],
        }.get(stage, ["eval_batch_size"])
        return {k: s[k] for k in keys}

    def _fingerprints(self) -> Dict[str, str]:
        """A stage's fingerprint covers its settings and every earlier stage's, so a
        changed world redoes everything after it."""
        out, prev = {}, ""
        for stage in STAGES:
            extra = self.overrides.get(stage, [])
            fp = _fingerprint([prev, stage, self._stage_settings(stage), extra])
            out[stage] = fp
            if stage in ("world", "tokenizer", "lm", "train"):  # the evaluations depend on these, not on each other
                prev = fp
        return out

    def _marker(self, stage: str) -> Path:
        return self.stage_dir / f"{stage}.json"

    def _done(self, stage: str, fp: str) -> Optional[Dict[str, Any]]:
        m = self._marker(stage)
        if not m.exists():
            return None
        try:
            info = json.loads(m.read_text())
        except json.JSONDecodeError:
            return None
        return info if info.get("fingerprint") == fp else None

    # ---- commands

    def _demo_command(self, stage: str) -> str:
        """``medcap demo --stage STAGE`` with the settings this demo runs with (those
        that differ from the defaults), so that the line reruns exactly this stage."""
        base = DemoSettings.quick() if self.quick else DemoSettings()
        args = ["medcap", "demo", "--out", str(self.out)] + (["--quick"] if self.quick else []) + ["--stage", stage]
        for f in fields(DemoSettings):
            v = getattr(self.settings, f.name)
            if v != getattr(base, f.name) and f.name != "threads":
                args.append(f"{f.name}={'null' if v is None else v}")
        for st, extra in self.overrides.items():
            args += [f"{st}.{o}" for o in extra]
        return shlex.join(args)

    def model_overrides(self) -> List[str]:
        """``model.*`` overrides for sizes that differ from the demo configs' (which
        hold the defaults of :class:`DemoSettings`)."""
        s, base = self.settings, DemoSettings()
        out: List[str] = []
        if s.bpe_merges != base.bpe_merges:
            vocab = 256 + s.bpe_merges + 12  # bytes + merges + special tokens; <|image|> one past
            out += [f"model.vocab_size={vocab}", f"model.image_token_id={vocab}"]
        if s.num_image_tokens != base.num_image_tokens:
            out.append(f"model.num_image_tokens={s.num_image_tokens}")
        if s.lm_layers != base.lm_layers:
            out.append(f"model.num_layers={s.lm_layers}")
        if s.lm_dim != base.lm_dim:
            out += [f"model.embed_dim={s.lm_dim}", f"model.intermediate_dim={2 * s.lm_dim}"]
        if s.image_size != base.image_size:
            out += [f"model.image_size={s.image_size}", f"model.patch_size={s.image_size // 2}"]
        return out

    def recipe_args(self, stage: str) -> List[str]:
        """``RECIPE --config CONFIG key=value ...`` of a recipe stage."""
        s = self.settings
        d = str(self.out)
        if stage == "train":
            # the demo's seed also seeds the vision side's initialisation and data order
            # (demo/train.yaml's own seed is 0, the default demo seed: same run as before)
            args = ["full_finetune_single_device", "--config", "demo/train", f"demo_dir={d}",
                    f"epochs={s.train_epochs}", f"seed={s.seed}"]
            if s.train_max_steps_per_epoch:
                args.append(f"max_steps_per_epoch={s.train_max_steps_per_epoch}")
        else:
            # Paths inside the demo folder go through ${demo_dir}: the line then reruns a
            # moved demo folder with one more key, demo_dir=NEW_PLACE.
            who = "trained" if "trained" in stage else "control"
            vc = f"${{demo_dir}}/{CHECKPOINT}" if who == "trained" else "null"
            args = ["generate", "--config", "demo/generate", f"demo_dir={d}", f"vision_checkpoint={vc}",
                    f"output_dir=${{demo_dir}}/eval/{who}", f"batch_size={s.eval_batch_size}"]
            if stage.endswith("captions"):
                args += ["test_metrics=True", "dataset_source=${demo_dir}/world/test.json"]
            else:
                args += ["test_omnimedvqa=True", "vqa_type=no_cond_desc", "dataset_source=${demo_dir}/world"]
        return args + self.model_overrides() + self.overrides.get(stage, [])

    def command(self, stage: str) -> str:
        if stage in RECIPE_STAGES:
            return shlex.join(["medcap", "run", *self.recipe_args(stage)])
        return self._demo_command(stage)

    def commands(self) -> Dict[str, str]:
        return {stage: self.command(stage) for stage in STAGES}

    def trained_checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    # ---- running

    def run(self) -> Dict[str, Any]:
        t_start = time.perf_counter()
        fps = self._fingerprints()
        todo = [self.only] if self.only else list(STAGES)
        say(f"output folder {self.out}; torch threads {self.threads}")
        redo = set(STAGES[STAGES.index(self.start):]) if self.start else set()
        if any(s.endswith("_captions") for s in todo):
            from medcap.eval import check_java

            check_java()  # the captioning metrics need Java: say so now, not after the training
        for k, stage in enumerate(todo, 1):
            done = None if (self.force or self.only or stage in redo) else self._done(stage, fps[stage])
            if done is not None and stage != "report":
                self.seconds[stage] = float(done.get("seconds", 0.0))
                say(f"[{k}/{len(todo)}] {stage}: already done ({self.seconds[stage]:.0f} s), skipped")
                continue
            say(f"[{k}/{len(todo)}] {stage}: {self.command(stage)}")
            started = self.stage_dir / f"{stage}.started.json"
            # an interrupted stage with the same settings may continue (training does)
            self._may_resume = not (self.force or self.only or stage in redo) and started.exists() and (
                json.loads(started.read_text()).get("fingerprint") == fps[stage]
            )
            _write_json(started, {"stage": stage, "fingerprint": fps[stage]})
            t0 = self._stage_t0 = time.perf_counter()
            cpu0 = _cpu_seconds()
            self._runner(stage)(stage)
            secs, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
            self.seconds[stage] = secs
            _write_json(self._marker(stage), {"stage": stage, "fingerprint": fps[stage], "seconds": secs,
                                              "cpu_seconds": cpu, "threads": self.threads,
                                              "command": self.command(stage), "finished": time.time()})
            say(f"[{k}/{len(todo)}] {stage}: done in {secs:.1f} s")
        summary = self.summary_path().exists() and json.loads(self.summary_path().read_text()) or {}
        say(f"finished in {time.perf_counter() - t_start:.1f} s")
        return summary

    def _runner(self, stage: str) -> Callable[[str], None]:
        """The method that runs ``stage`` (the four evaluations share one)."""
        return getattr(self, "_stage_eval" if stage.startswith("eval_") else f"_stage_{stage}")

    def summary_path(self) -> Path:
        return self.out / "summary.json"

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["MKL_NUM_THREADS"] = str(self.threads)
        # run the recipes against this checkout's medcap, wherever the command starts from
        import medcap

        root = str(Path(medcap.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def _run_recipe(self, stage: str, extra: Sequence[str] = ()) -> None:
        from medcap._launch import build_run_command

        cmd = build_run_command(self.recipe_args(stage) + list(extra))
        rc = _tee(cmd, self.log_dir / f"{stage}.log", self._env())
        if rc != 0:
            raise RuntimeError(
                f"stage {stage} failed (exit status {rc}); its output is in {self.log_dir / (stage + '.log')}. "
                f"Fix the cause and run `medcap demo --out {self.out}` again: finished stages are kept."
            )

    # ---- the stages

    def _stage_world(self, stage: str) -> None:
        from medcap.demo._world import write_world

        write_world(self.world, self.settings)

    def _stage_tokenizer(self, stage: str) -> None:
        from medcap.demo._bpe import build_tokenizer

        build_tokenizer(self.llm / "original", self.settings.bpe_merges)

    def _stage_lm(self, stage: str) -> None:
        import torch

        from medcap.demo._lm import pretrain_and_save

        torch.set_num_threads(self.threads)
        pretrain_and_save(self.llm, self.settings)

    def _stage_train(self, stage: str) -> None:
        # A stopped training run continues from its last saved state.
        state = self.train_dir / "checkpoint" / "recipe_state.pt"
        extra = []
        if state.exists() and self._may_resume:
            extra = ["resume_from_checkpoint=True"]
            say(f"continuing the stopped training run ({state})")
        elif self.train_dir.exists():
            import shutil

            shutil.rmtree(self.train_dir)
        self._run_recipe(stage, extra)
        if not self.trained_checkpoint().exists():
            raise RuntimeError(f"training finished but {self.trained_checkpoint()} is missing")

    def _stage_eval(self, stage: str) -> None:
        who = "trained" if "trained" in stage else "control"
        out = self.out / "eval" / who
        # Results files are reused by the suites; a forced or changed stage starts clean.
        pattern = "metrics-*" if stage.endswith("captions") else "omnimedvqa-*"
        for p in out.glob(pattern):
            p.unlink()
        self._run_recipe(stage)

    def _stage_report(self, stage: str) -> None:
        from medcap.demo._report import collect_summary, draw_report, print_summary

        summary = collect_summary(self, STAGES, TARGET_MARGINS)
        _write_json(self.summary_path(), summary)
        try:
            problems = draw_report(self, summary, self.out / "report.png")
        except Exception as e:  # the numbers matter more than the picture; say why it is missing
            problems = [f"report.png could not be drawn: {type(e).__name__}: {e}"]
        seconds = summary["seconds"]  # the report's own time, now that it is known
        seconds.pop("total", None)
        seconds["report"] = round(time.perf_counter() - self._stage_t0, 1)
        seconds["total"] = round(sum(seconds.values()), 1)
        summary["report_problems"] = problems
        _write_json(self.summary_path(), summary)
        print_summary(summary, problems)
