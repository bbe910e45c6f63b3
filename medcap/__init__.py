"""medcap: a frozen Llama-3.1-8B-Instruct with a trained BiomedCLIP vision tower and
projector, for medical image captioning and VQA.

The public Python API is the ``__all__`` of each package (README.md, "Python API"):
``medcap.models`` (builders, ``load_model``, the tokenizer), ``medcap.data``,
``medcap.generation`` (``GenerationEngine``), ``medcap.checkpointing`` and
``medcap.eval`` (the evaluation suites). Modules whose names start with ``_`` are
internal; ``medcap.testing`` holds stand-ins for tests and is never imported by the rest.
"""
