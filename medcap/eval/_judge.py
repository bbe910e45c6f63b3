"""The LLM judge and chat tool (the reference's ``chat_llama3_quant.py``), behind
``tools/judge.py``.

A Hugging Face chat model in 4 or 8 bit (bitsandbytes), local files only, greedy, at
most 200 new tokens (docs/internals.md has the reference's settings).

* ``chat``: an interactive prompt (``q`` quits); the conversation is kept.
* ``eval_vqa``: each row of a raw VQA file judged right or wrong (the reference's
  prompt; a reply containing ``right`` scores 1), written as judged to
  ``{RAW}-70B_{bit}bit-{np.round(accuracy, 5)}.csv`` with the reference's columns; a
  stopped run continues from its partial file; progress through ``medcap._io.progress``.

``--endpoint URL --judge-model NAME`` judges with any OpenAI-compatible server instead
(``medcap serve``, vLLM, a hosted model: ``_llm_judge.JudgeClient``), with the same
prompt, rule and file.

In this file, in order: the judge's settings and prompt, ``Judge`` (the model),
``eval_vqa``, ``chat_loop``, and the command line (``judge_main``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from medcap._io import progress as progress_bar
from medcap.eval._results import CsvJournal, accuracy_name, cell, read_csv_rows

log = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "Respond with only RIGHT or WRONG to indicate whether we predicted it correctly.\n\n"
    "Question: {question}\nOur answer: {generated}\nCorrect answer: {output}"
)
JUDGED_COLUMNS = ("image", "instruction", "generated")  # the reference's judged file
DEFAULT_JUDGE_PATH = "./models/llama3/Meta-Llama-3.1-70B-Instruct"
JUDGE_MAX_NEW_TOKENS = 200
BITS = (4, 8, 16, 32)  # 16 / 32: unquantised bf16 / fp32 (small models, CPUs without bitsandbytes)


def quantization_config(bit: int):
    """The reference's bitsandbytes settings for ``bit`` in (4, 8); None for 16 / 32."""
    if bit not in BITS:
        raise ValueError(f"--bit must be one of {list(BITS)}, got {bit}")
    if bit in (16, 32):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if bit == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def judge_prompt(question: str, generated: str, output: str) -> str:
    return JUDGE_PROMPT.format(question=question, generated=generated, output=output)


def is_right(reply: str) -> int:
    return int("right" in (reply or "").lower())


class Judge:
    """A local HF chat model answering one conversation at a time, greedily."""

    def __init__(self, model_path: str, bit: int = 4, max_new_tokens: int = JUDGE_MAX_NEW_TOKENS):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"judge model folder not found: {str(path)!r} (a local Hugging Face folder, e.g. "
                "Meta-Llama-3.1-70B-Instruct; pass it with --model_path)"
            )
        self.bit = bit
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer in {str(path)!r} has no chat template; the judge needs a chat model")
        kwargs = dict(device_map="auto", local_files_only=True, dtype=torch.float32 if bit == 32 else torch.bfloat16)
        q = quantization_config(bit)
        if q is not None:
            kwargs["quantization_config"] = q
        self.model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        self.model.eval()
        stop = [self.tokenizer.eos_token_id]
        eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        if isinstance(eot, int) and eot != self.tokenizer.unk_token_id and eot not in stop:
            stop.append(eot)
        self.stop_ids = [s for s in stop if s is not None]

    def chat(self, messages: Sequence[Dict[str, str]]) -> str:
        """The model's reply to a conversation (``[{"role", "content"}, ...]``), stripped."""
        import torch
        from transformers import GenerationConfig

        enc = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        device = next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc.get("attention_mask")
        gen = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.stop_ids[0],
        )
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                generation_config=gen,
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def judged_paths(csv_path: str | Path, bit: int):
    csv_path = Path(csv_path)
    stem = csv_path.with_suffix("")
    return Path(f"{stem}-70B_{bit}bit.partial.csv"), lambda acc: Path(f"{stem}-70B_{bit}bit-{accuracy_name(acc, 5)}.csv")


def eval_vqa(
    chat: Callable[[List[Dict[str, str]]], str],
    csv_path: str | Path,
    bit: int,
    *,
    progress: bool = True,
) -> Dict[str, object]:
    """Judge every row of a raw VQA file; returns ``{"accuracy", "rows", "path"}``."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"results file not found: {str(csv_path)!r}")
    rows = read_csv_rows(csv_path)
    missing = {"instruction", "output", "generated"} - set(rows[0] if rows else {})
    if rows and missing:
        raise ValueError(f"{csv_path} lacks the columns {sorted(missing)}: is it a raw VQA file of recipes/generate.py?")
    from medcap.generation import question_from_instruction  # torch: only once there is work

    partial, final_for = judged_paths(csv_path, bit)
    prompts = [judge_prompt(question_from_instruction(r["instruction"]), r["generated"], r["output"]) for r in rows]
    journal = CsvJournal(None, JUDGED_COLUMNS, partial=partial, bom=True)
    if len(journal) > len(rows) or any(
        a["instruction"] != cell(p) or a["image"] != cell(r.get("image", "")) for a, p, r in zip(journal.rows(), prompts, rows)
    ):
        raise ValueError(f"{partial} does not match {csv_path}; move it away to judge again")
    bar = progress_bar(len(rows) - len(journal), "judging", "row", enabled=progress)  # a bar on a terminal only
    for r, prompt in list(zip(rows, prompts))[len(journal) :]:
        reply = chat([{"role": "user", "content": prompt}])
        journal.append([{"image": r.get("image", ""), "instruction": prompt, "generated": reply}])
        bar.update(1)
    bar.close()
    done = journal.rows()
    right = sum(is_right(r["generated"]) for r in done)
    acc = right / len(done) if done else float("nan")
    path = journal.finish(final_for(acc))
    print(f"accuracy: {acc:.5f} ({right}/{len(done)}) -> {path}", flush=True)
    return {"accuracy": acc, "rows": len(done), "path": str(path)}


def chat_loop(
    chat: Callable[[List[Dict[str, str]]], str],
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[[str], None] = print,
) -> List[Dict[str, str]]:
    """Read a line, answer it, keep the conversation; ``q`` (or end of input) quits."""
    messages: List[Dict[str, str]] = []
    while True:
        try:
            line = input_fn("User ('q' to quit): ")
        except EOFError:
            break
        if line.strip() == "q":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = chat(messages)
        messages.append({"role": "assistant", "content": reply})
        print_fn(f"Assistant: {reply}")
    return messages


def judge_main(argv: Optional[Sequence[str]] = None, judge_factory=None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/judge.py",
        description="Chat with a local (quantised) LLM, or judge a raw VQA results file with it.",
    )
    p.add_argument("--exp", required=True, choices=["chat", "eval_vqa"])
    p.add_argument("--csv-path", help="raw VQA results file (eval_vqa), e.g. vqarad-no_cond_desc-raw-CKPT.csv")
    p.add_argument("--model-path", default=DEFAULT_JUDGE_PATH, help=f"local HF model folder (default {DEFAULT_JUDGE_PATH})")
    p.add_argument("--bit", type=int, default=4, choices=list(BITS), help="4 or 8: bitsandbytes; 16/32: unquantised")
    p.add_argument("--max-new-tokens", type=int, default=JUDGE_MAX_NEW_TOKENS)
    p.add_argument("--endpoint", default=None, help="judge with an OpenAI-compatible server at this base URL "
                   "(e.g. http://127.0.0.1:8000/v1) instead of loading --model-path; needs --judge-model")
    p.add_argument("--judge-model", default=None, help="the model name the --endpoint serves")
    p.add_argument("--no-progress", action="store_true")
    from medcap._cmdline import accept_snake_case  # the older --snake_case spellings still work

    args = accept_snake_case(p).parse_args(argv)
    if args.exp == "eval_vqa" and not args.csv_path:
        p.error("--exp eval_vqa needs --csv-path")
    if args.exp == "eval_vqa" and not Path(args.csv_path).is_file():
        p.error(f"--csv-path {args.csv_path!r} does not exist")
    if args.endpoint:
        judge = _http_judge(p, args)
    else:
        judge = (judge_factory or Judge)(args.model_path, args.bit, args.max_new_tokens)
    if args.exp == "chat":
        chat_loop(judge.chat)
    else:
        eval_vqa(judge.chat, args.csv_path, args.bit, progress=not args.no_progress)
    return 0


def _http_judge(parser: argparse.ArgumentParser, args):
    """The judge behind an OpenAI-compatible endpoint (``_llm_judge.JudgeClient``), checked to answer."""
    from medcap.eval._llm_judge import JudgeClient, JudgeError

    if not args.judge_model:
        parser.error("--endpoint needs --judge-model (the model name the endpoint serves)")
    try:
        judge = JudgeClient(args.endpoint, args.judge_model, max_tokens=args.max_new_tokens)
        judge.check()
    except JudgeError as e:
        parser.error(str(e))
    return judge
