"""The offline end-to-end demo: a synthetic medical-like world, a small tokenizer and a
text-only LM made on the spot, then medcap's own training and generation recipes.

    medcap demo --out datasets/demo          # or: make demo

See :mod:`medcap.demo._main` for the stages and their commands.
"""

from medcap.demo._bpe import build_tokenizer, bpe_encode, pretokenize, train_bpe, vocab_ranks
from medcap.demo._lm import (
    LMSizes,
    build_decoder,
    conversation,
    corpus_texts,
    evaluate_text,
    hf_config,
    note,
    pretrain,
    pretrain_and_save,
    save_hf,
)
from medcap.demo._main import STAGES, TARGETS, Demo, DemoSettings, main
from medcap.demo._report import chance_accuracy, collect_summary, draw_report, read_eval
from medcap.demo._world import (
    DATASET_NAME,
    INTENSITIES,
    KINDS,
    LOCATIONS,
    MODALITIES,
    MODALITY_KEYS,
    QUESTION_TYPES,
    SIZES,
    Finding,
    Modality,
    caption,
    make_split,
    omnimedvqa_questions,
    render,
    sharegpt_records,
    write_world,
)

__all__ = [
    "DATASET_NAME",
    "Demo",
    "DemoSettings",
    "Finding",
    "INTENSITIES",
    "KINDS",
    "LMSizes",
    "LOCATIONS",
    "MODALITIES",
    "MODALITY_KEYS",
    "Modality",
    "QUESTION_TYPES",
    "SIZES",
    "STAGES",
    "TARGETS",
    "bpe_encode",
    "build_decoder",
    "build_tokenizer",
    "caption",
    "chance_accuracy",
    "collect_summary",
    "conversation",
    "corpus_texts",
    "draw_report",
    "evaluate_text",
    "hf_config",
    "main",
    "make_split",
    "note",
    "omnimedvqa_questions",
    "pretokenize",
    "pretrain",
    "pretrain_and_save",
    "read_eval",
    "render",
    "save_hf",
    "sharegpt_records",
    "train_bpe",
    "vocab_ranks",
    "write_world",
]
