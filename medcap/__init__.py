"""medcap: a frozen Llama-3.1-8B-Instruct with a trained BiomedCLIP vision tower and
projector, for medical image captioning and VQA.

``medcap.load(CHECKPOINT)`` is a trained model in one line (``caption``, ``ask``, ``chat``;
``medcap._api``). The rest of the public Python API is the ``__all__`` of each package (README.md, "Python API"):
``medcap.models`` (builders, ``load_model``, the tokenizer), ``medcap.data``,
``medcap.generation`` (``GenerationEngine``), ``medcap.models`` and
``medcap.eval`` (the evaluation suites). Modules whose names start with ``_`` are
internal; ``medcap.testing`` holds stand-ins for tests and is never imported by the rest.
"""

# Package plumbing, not an export: the packages' __init__s export a few names without
# importing their modules until a name is used (PEP 562), so ``import medcap.data`` stays
# light and commands such as ``tools/convert_to_sharegpt.py --help`` start without torch.
import importlib
import sys
from typing import Any, Callable, List, Mapping, Tuple

__all__: List[str] = ["load"]  # the rest of the API lives in the packages


def lazy_attrs(package: str, where: Mapping[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public names live in the
    modules ``where`` maps them to; a name is imported on first use, then kept."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__


# ``medcap.load``, imported on first use: ``import medcap`` stays free of torch.
__getattr__, __dir__ = lazy_attrs(__name__, {"load": "medcap._api"})
