"""``medcap export``: a trained model as a Hugging Face model folder that ``transformers`` loads
alone (``trust_remote_code=True``) and medcap's own commands read back.

- ``_folder``: ``export_model`` (which model, the checks, every file of the folder);
- ``_tokenizer``: the tokenizer files and the chat template, checked against medcap's prompt ids;
- ``_card``: the model card (training from the checkpoint's metadata, ``medcap report``'s scores);
- ``_main``: the command line (one-line errors);
- ``hf/``: the model, processor and configuration code copied into the folder (``configuration_medcap``,
  ``modeling_medcap``, ``processing_medcap``): package data, not modules of medcap; they import torch,
  transformers, safetensors, Pillow and timm, never medcap.

Names are resolved on first use (PEP 562): ``medcap export -h`` starts without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap import lazy_attrs

_WHERE = {"export_model": "medcap.export._folder", "export_main": "medcap.export._main"}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attrs(__name__, _WHERE)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from medcap.export._folder import export_model  # noqa: F401
    from medcap.export._main import export_main  # noqa: F401
