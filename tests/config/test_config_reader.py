"""medcap.config._reader: typed configs read once, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Literal, Optional

import pytest

from medcap.config import ConfigError, check_component, from_config, parse_args, plain


@dataclass
class Inner:
    path: str
    files: Optional[List[str]] = None
    LEGACY: ClassVar[Dict[str, Optional[str]]] = {"_component_": None}


@dataclass
class Conf:
    inner: Inner
    batch_size: int = field(default=8, metadata={"min": 1})
    lr: float = 2e-5
    mode: Literal["a", "b"] = "a"
    on: bool = False
    top_k: Optional[int] = None
    LEGACY: ClassVar[Dict[str, Optional[str]]] = {"old_size": "batch_size", "unused": None}


def test_defaults_and_conversion():
    c = from_config(Conf, {"inner": {"path": "p", "files": "a.bin, b.bin"}, "batch_size": "4", "lr": "1e-4", "on": "true"})
    assert (c.batch_size, c.lr, c.on, c.mode, c.top_k) == (4, 1e-4, True, "a", None)
    assert c.inner.files == ["a.bin", "b.bin"]


@pytest.mark.parametrize(
    "data,match",
    [
        ({"batch_sze": 4}, r"unknown key 'batch_sze' \(did you mean 'batch_size'\?\)"),
        ({"inner": {"path": "p", "fils": []}}, r"unknown key 'inner.fils' \(did you mean 'files'\?\)"),
        ({"batch_size": "four"}, r"batch_size='four' must be a whole number"),
        ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),
        ({"lr": "fast"}, r"lr='fast' must be a number"),
        ({"mode": "c"}, r"mode='c': choose one of \['a', 'b'\]"),
        ({"on": "maybe"}, r"on='maybe' must be True or False"),
        ({"top_k": 2.5}, r"top_k=2.5 must be a whole number"),
        ({"batch_size": None}, r"batch_size needs a value"),
    ],
)
def test_every_error_names_its_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_config(Conf, {"inner": {"path": "p"}, **data})


def test_missing_required_and_legacy_keys():
    with pytest.raises(ConfigError, match="lacks inner"):
        from_config(Conf, {})
    c = from_config(Conf, {"inner": {"path": "p", "_component_": "x.Y"}, "old_size": 3, "unused": "whatever"})
    assert c.batch_size == 3


def test_variables_are_allowed_only_as_variables():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"root": "/data", "inner": {"path": "${root}/x"}})
    data, variables = plain(cfg)
    assert variables == ["root"] and data["inner"]["path"] == "/data/x"
    assert from_config(Conf, data, variables=variables).inner.path == "/data/x"
    with pytest.raises(ConfigError, match="unknown key 'root'"):
        from_config(Conf, data)


def test_component_arguments_are_checked_against_the_builder():
    check_component({"_component_": "medcap.models.medcap_tiny", "vocab_size": 10, "image_token_id": 10}, "model")
    with pytest.raises(ConfigError, match=r"model.num_layer: .* takes no argument 'num_layer' \(did you mean 'num_layers'\?\)"):
        check_component({"_component_": "medcap.models.medcap_tiny", "num_layer": 2}, "model")
    with pytest.raises(ConfigError, match=r"model._component_='medcap.models.nope' cannot be found"):
        check_component({"_component_": "medcap.models.nope"}, "model")


@pytest.mark.parametrize("typed", ["yes", "[urgent] what is it?", "Modality: which one?", "a, b", "null", "1e-5"])
def test_free_text_keys_keep_what_was_typed(typed, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("prompt: null\nbatch_size: 2\n")
    _, cfg = parse_args(["--config", str(cfg_file), f"prompt={typed}", "batch_size=3"], free_text=("prompt",))
    assert cfg.prompt == typed and cfg.batch_size == 3
