"""The resumable state file and the random generators it carries."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medcap.training import capture_rng_state, load_recipe_state, restore_rng_state, save_recipe_state


def _draws():
    return (torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist())


def test_rng_state_round_trip_through_the_state_file(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _draws()
    save_recipe_state(tmp_path / "s.pt", {"rng": [capture_rng_state()]})
    expected = _draws()
    _draws()  # move on
    state = load_recipe_state(tmp_path / "s.pt")  # weights_only=True load
    restore_rng_state(state["rng"][0])
    assert _draws() == expected


def test_missing_or_foreign_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        load_recipe_state(tmp_path / "nope.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a medcap recipe state"):
        load_recipe_state(tmp_path / "other.pt")
