"""The demo's stages (``medcap.demo._stages``): each stage's command, the fingerprints that
decide what is redone, resume after a failed stage, the configs' default sizes."""

from __future__ import annotations

import json
import shlex

import pytest

from medcap.demo._main import build_parser
from medcap.demo._settings import STAGES, DemoSettings, parse_settings
from medcap.demo._stages import Demo


def test_commands(tmp_path):
    d = Demo(tmp_path / "d", DemoSettings.quick(), quick=True, overrides={"train": ["optimizer.lr=3e-3"]})
    cmds = d.commands()
    assert list(cmds) == list(STAGES)
    train = shlex.split(cmds["train"])
    assert train[:4] == ["medcap", "run", "full_finetune_single_device", "--config"]
    assert "epochs=1" in train and "optimizer.lr=3e-3" in train and f"demo_dir={d.out}" in train
    ctrl = shlex.split(cmds["eval_control_vqa"])
    assert "vision_checkpoint=null" in ctrl and "test_omnimedvqa=True" in ctrl
    trained = shlex.split(cmds["eval_trained_captions"])
    assert "test_metrics=True" in trained and f"demo_dir={d.out}" in trained
    # paths inside the demo folder follow demo_dir, so a moved folder reruns with demo_dir=NEW
    assert "vision_checkpoint=${demo_dir}/train/checkpoint/meta_model_last.safetensors" in trained
    assert "dataset_source=${demo_dir}/world/test.json" in trained and "output_dir=${demo_dir}/eval/trained" in trained
    assert d.trained_checkpoint() == d.out / "train" / "checkpoint" / "meta_model_last.safetensors"
    lm = shlex.split(cmds["lm"])
    assert lm[:2] == ["medcap", "demo"] and "--quick" in lm and lm[lm.index("--stage") + 1] == "lm"
    assert "train.optimizer.lr=3e-3" in lm  # the settings travel with every stage's command
    # a command parses back into the same settings
    args = build_parser().parse_args(lm[2:])
    s, over = parse_settings(args.settings, DemoSettings.quick())
    assert s == d.settings and over == d.overrides


def test_fingerprints_chain(tmp_path):
    a = Demo(tmp_path, DemoSettings())._fingerprints()
    b = Demo(tmp_path, DemoSettings(lm_steps=5))._fingerprints()
    # the LM changed: everything from the LM on is redone, the world and tokenizer are kept
    assert a["world"] == b["world"] and a["tokenizer"] == b["tokenizer"]
    assert all(a[s] != b[s] for s in STAGES[2:])
    c = Demo(tmp_path, DemoSettings(threads=1))._fingerprints()
    assert c == a  # speed settings do not invalidate results


def test_failed_stage_is_reported_and_resumable(tmp_path, capsys, monkeypatch):
    from medcap.demo import _main

    d = Demo(tmp_path, DemoSettings.quick(), quick=True)
    calls = []
    monkeypatch.setattr(Demo, "_stage_world", lambda self, stage: calls.append(stage))

    def boom(self, stage):
        raise RuntimeError("stage tokenizer failed (exit status 1)")

    monkeypatch.setattr(Demo, "_stage_tokenizer", boom)
    with pytest.raises(RuntimeError):
        d.run()
    assert json.loads((tmp_path / "stages" / "world.json").read_text())["stage"] == "world"
    assert not (tmp_path / "stages" / "tokenizer.json").exists()
    # a new run skips the finished world stage
    monkeypatch.setattr(Demo, "_stage_tokenizer", lambda self, stage: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _main.main(["--out", str(tmp_path), "--quick"]) == 130
    assert calls == ["world"]
    assert "world: already done" in capsys.readouterr().out


def test_configs_hold_the_default_sizes():
    """demo/train.yaml and demo/generate.yaml describe the same model, and it is the one
    DemoSettings' defaults build (so the default commands need no model overrides)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "demo"
    train, gen = (OmegaConf.load(root / f"{n}.yaml") for n in ("train", "generate"))
    assert OmegaConf.to_container(train.model) == OmegaConf.to_container(gen.model)
    s = DemoSettings()
    m = train.model
    assert m.vocab_size == m.image_token_id == 256 + s.bpe_merges + 12
    assert (m.num_image_tokens, m.num_layers, m.embed_dim, m.intermediate_dim) == (
        s.num_image_tokens, s.lm_layers, s.lm_dim, 2 * s.lm_dim)
    assert (m.image_size, m.patch_size) == (s.image_size, s.image_size // 2)
    assert Demo(Path("/tmp/x"), s).model_overrides() == []
    over = Demo(Path("/tmp/x"), DemoSettings(lm_dim=64, bpe_merges=200, image_size=48)).model_overrides()
    assert {"model.vocab_size=468", "model.image_token_id=468", "model.embed_dim=64", "model.intermediate_dim=128",
            "model.image_size=48", "model.patch_size=24"} == set(over)
