"""Evaluation: the reference's suites (captioning metrics, VQA-RAD, OmniMedVQA)
run through one resumable loop, the two-step VQA protocol, scoring, the judge,
and ``rescore`` (every number recomputed from the rows on disk).

Names are imported when first used, so ``tools/judge.py --help`` and
``medcap rescore -h`` start without loading torch.
"""

from medcap import lazy_attrs

# public name -> the module that defines it (relative to this package when it starts with _)
_EXPORTS = {
    # the one loop and its items
    "EvalItem": "_loop",
    "run_items": "_loop",
    "results_lock": "_loop",
    # the suites (what recipes/generate.py runs) and their config
    "GenerateConfig": "medcap.config",
    "ImageLoader": "_suites",
    "checkpoint_name": "_suites",
    "run_test_metrics": "_suites",
    "run_test_vqarad": "_suites",
    "run_test_omnimedvqa": "_suites",
    "VQA_TYPES": "_suites",
    "run_vqa": "_suites",
    # data sets
    "read_caption_set": "_suites",
    "read_vqarad": "_suites",
    "read_omnimedvqa": "_suites",
    # scores
    "score_file": "_scoring",
    "letter_prompt": "_scoring",
    "LETTER_INSTRUCTION": "_scoring",
    "caption_metrics": "_scoring",
    "check_java": "_scoring",
    "rescore": "_rescore",
    "rescore_main": "_rescore",
    "report_main": "_report",
    "read_csv_rows": "_loop",
    "judge_main": "_judge",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attrs(
    __name__, {name: f"medcap.eval.{module}" if module.startswith("_") else module for name, module in _EXPORTS.items()}
)
