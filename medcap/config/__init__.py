"""Configs read once: a recipe's YAML and ``key=value`` overrides become one typed
dataclass, checked before anything heavy is built.

- ``_reader``: what every recipe shares: the command line and the YAML, the typed
  build (unknown keys named with the closest valid one, values converted and bounded
  by key, legacy keys mapped), the checks of components and paths, ``run_recipe``
  (user errors as one line) and ``validate`` (``medcap validate``);
- ``_train``: ``TrainConfig``, the fine-tuning recipes' config, and the reference's
  legacy training keys and values;
- ``_generate``: ``GenerateConfig``, the generate recipe's config.

Plain Python (omegaconf is imported when a YAML is read), so the ``medcap`` command
checks a config before torch is imported. Names are resolved on first use (PEP 562).
Why a config is read this way: docs/internals.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap import lazy_attrs

# What recipes, the medcap command and users call.
_EXPORTS = {
    "medcap.config._reader": [
        "SCHEMAS",
        "ConfigError",
        "from_config",
        "must_exist",
        "parse_args",
        "plain",
        "run_recipe",
        "save_resolved",
        "schema_for",
        "validate",
    ],
    "medcap.config._train": ["TrainConfig"],
    "medcap.config._generate": ["FREE_TEXT", "GenerateConfig"],
}
# Every other name medcap.config held before it became a package stays importable from
# it (tests check some of them); these are not exported.
_ALSO = {
    "medcap.config._reader": ["DEBUG_ENV", "check_component", "resolve", "suggest"],
    "medcap.config._train": [
        "CHECKPOINT_FORMATS",
        "DEFAULT_METRIC_LOGGER",
        "HF_CHECKPOINTER",
        "LOSS_COMPONENT",
        "MEDCAP_CHAT_DATASET",
        "TORCHTUNE_CHAT_DATASET",
        "TrainCheckpointerConfig",
        "resolve_dataset_config",
        "resolve_loss_config",
        "resume_mode",
    ],
    "medcap.config._generate": ["SUITES", "VQA_TYPE", "GenerateCheckpointerConfig"],
}
_PUBLIC = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_attrs(__name__, {**_PUBLIC, **{n: mod for mod, names in _ALSO.items() for n in names}})

if TYPE_CHECKING:  # for type checkers and IDEs: the exported names, eagerly
    from medcap.config._generate import FREE_TEXT, GenerateConfig  # noqa: F401
    from medcap.config._reader import (  # noqa: F401
        SCHEMAS,
        ConfigError,
        from_config,
        must_exist,
        parse_args,
        plain,
        run_recipe,
        save_resolved,
        schema_for,
        validate,
    )
    from medcap.config._train import TrainConfig  # noqa: F401
