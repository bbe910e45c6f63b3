"""The demo's settings (``medcap.demo._settings``): ``key=value`` pairs and per-stage overrides."""

from __future__ import annotations

import pytest

from medcap.demo._settings import DemoSettings, parse_settings


def test_settings_and_stage_overrides():
    s, over = parse_settings(["lm_steps=7", "lm_lr=0.01", "train_max_steps_per_epoch=null",
                              "train.optimizer.lr=3e-3"], DemoSettings())
    assert s.lm_steps == 7 and s.lm_lr == 0.01 and s.train_max_steps_per_epoch is None
    assert over == {"train": ["optimizer.lr=3e-3"]}
    with pytest.raises(SystemExit, match="unknown setting"):
        parse_settings(["lm_stepz=3"], DemoSettings())
    with pytest.raises(SystemExit, match="not a valid"):
        parse_settings(["lm_steps=many"], DemoSettings())
    with pytest.raises(SystemExit, match="key=value"):
        parse_settings(["lm_steps"], DemoSettings())
