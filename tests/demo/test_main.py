"""The demo's command line (``medcap.demo._main``): the --seed option and the settings it shapes."""

from __future__ import annotations

import shlex

from medcap.demo._main import build_parser
from medcap.demo._settings import STAGES
from medcap.demo._stages import Demo


def test_seed_option(tmp_path):
    """--seed N seeds the world, the LM and the vision training; without it the seed is 0,
    which is demo/train.yaml's own seed (the published figures' run)."""
    from medcap.demo._main import settings_from_args

    s, _ = settings_from_args(build_parser().parse_args(["--out", str(tmp_path), "--seed", "3"]))
    assert s.seed == 3
    assert "seed=3" in shlex.split(Demo(tmp_path, s).command("train"))
    default, _ = settings_from_args(build_parser().parse_args(["--out", str(tmp_path)]))
    assert default.seed == 0 and "seed=0" in shlex.split(Demo(tmp_path, default).command("train"))
    # the seed shapes the world and so every later stage
    a, b = Demo(tmp_path, default)._fingerprints(), Demo(tmp_path, s)._fingerprints()
    assert all(a[stage] != b[stage] for stage in STAGES)
    # the option wins over a seed=N setting on the same line
    s2, _ = settings_from_args(build_parser().parse_args(["--seed", "2", "seed=5"]))
    assert s2.seed == 2
