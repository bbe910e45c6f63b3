"""Evaluation: the reference's suites (captioning metrics, VQA-RAD, OmniMedVQA) and the
field's benchmarks, each run in the steps ``recipes/generate.py`` takes; the two-step
VQA protocol, scoring, the judge, and ``rescore`` (every number recomputed from the
rows on disk).

Modules: ``_run`` (the context and the steps), ``_results`` (results files and their
records), ``_protocol`` (the two-step VQA protocol), ``_choices`` (a choice read as a
letter), one module per suite (``_captions``, ``_vqarad``, ``_omnimedvqa``,
``_benchmarks`` with ``_benchmark_readers`` and ``_benchmark_scores``), the peers'
scoring conventions (``_conventions``), the LLM judge over HTTP (``_llm_judge``), and
the commands ``_judge``, ``_rescore``, ``_report``.

Names are imported when first used, so ``tools/judge.py --help`` and
``medcap rescore -h`` start without loading torch.
"""

from medcap import lazy_attrs

# public name -> the module of this package that defines it
_EXPORTS = {
    # one suite's run: its context, and the steps recipes/generate.py takes
    "SuiteRun": "_run",
    "Ranks": "_run",
    "EvalItem": "_run",
    "ImageLoader": "_run",
    "checkpoint_name": "_run",
    "resume_plan": "_run",
    "pending_batches": "_run",
    "finish": "_run",
    "results_lock": "_results",
    "file_identity": "_results",
    "folder_identity": "_results",
    "read_csv_rows": "_results",
    # the suites, and each run whole
    "CaptionSuite": "_captions",
    "VQARADSuite": "_vqarad",
    "OmniMedVQASuite": "_omnimedvqa",
    "BenchmarkSuite": "_benchmarks",
    "run_test_metrics": "_captions",
    "run_test_vqarad": "_vqarad",
    "run_test_omnimedvqa": "_omnimedvqa",
    "run_benchmark": "_benchmarks",
    "VQA_TYPES": "_protocol",
    "run_vqa": "_protocol",
    # data sets
    "read_caption_set": "_captions",
    "read_vqarad": "_vqarad",
    "read_omnimedvqa": "_omnimedvqa",
    "OMNIMEDVQA_MODALITIES": "_omnimedvqa",
    # scores
    "score_file": "_omnimedvqa",
    "letter_prompt": "_choices",
    "LETTER_INSTRUCTION": "_choices",
    "caption_metrics": "_captions",
    "check_java": "_captions",
    "rescore": "_rescore",
    "rescore_main": "_rescore",
    "report_main": "_report",
    "judge_main": "_judge",
    "JudgeClient": "_llm_judge",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attrs(__name__, {name: f"medcap.eval.{module}" for name, module in _EXPORTS.items()})
