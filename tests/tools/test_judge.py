"""tools/judge.py: the reference's judge prompt and scoring, its output file, resuming,
the chat loop, and a real (tiny, 4-bit) Hugging Face Llama made here."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from medcap.eval import judge_main, read_csv_rows
from medcap.eval._judge import Judge, chat_loop, eval_vqa, is_right, judge_prompt, quantization_config
from medcap.eval._protocol import answer_messages
from medcap.eval._results import write_csv_atomic
from medcap.eval._run import RAW_COLUMNS
from medcap.generation import build_prompt, prompt_text

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny HF Llama (widths of 64: bitsandbytes quantises in blocks of 64) whose greedy reply is always the word RIGHT (vocabulary id 0, and
    a zeroed final norm makes every logit equal), with a word-level tokenizer and a
    Llama 3 style chat template; saved as a local model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("judge_model")
    words = ["RIGHT", "[UNK]", "WRONG", "right", "wrong", "yes", "no", "Question:", "answer:", "Our", "Correct", "Respond"]
    vocab = {w: i for i, w in enumerate(words + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   unk_token="[UNK]", additional_special_tokens=SPECIALS[2:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=vocab["<|begin_of_text|>"],
                      eos_token_id=vocab["<|end_of_text|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(out)
    return out


def _raw_file(path: Path, tok_llama3, answers):
    rows = []
    for i, (gen, out) in enumerate(answers):
        p = build_prompt(tok_llama3, answer_messages("no_cond_desc", "a description", f"Is there finding {i}?"),
                         num_image_tokens=4)
        rows.append({"image": f"i{i}.png", "instruction": prompt_text(tok_llama3, p), "output": out, "generated": gen})
    write_csv_atomic(path, list(RAW_COLUMNS), rows)
    return rows


@pytest.fixture(scope="module")
def llama3_tok(tiny_llm):
    from medcap.models import llama3_tokenizer

    return llama3_tokenizer(tiny_llm["tokenizer_path"], tiny_llm["special_tokens_path"])


def test_judge_prompt_and_right_rule():
    assert judge_prompt("Is it?", "Yes.", "yes") == (
        "Respond with only RIGHT or WRONG to indicate whether we predicted it correctly.\n\n"
        "Question: Is it?\nOur answer: Yes.\nCorrect answer: yes"
    )
    assert [is_right(r) for r in ["RIGHT", "Right.", "wrong", "WRONG", "", "not right", "Alright"]] == [1, 1, 0, 0, 0, 1, 1]


def test_quantization_configs_are_the_references():
    import torch

    q4 = quantization_config(4)
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(8).load_in_8bit
    assert quantization_config(16) is None
    with pytest.raises(ValueError):
        quantization_config(3)


def test_eval_vqa_writes_the_references_file_and_resumes(llama3_tok, tmp_path):
    answers = [("Yes.", "yes"), ("No", "yes"), ("left", "left"), ("maybe", "no"), ("", "yes")]
    replies = {0: "RIGHT", 1: "WRONG", 2: "Right", 3: "wrong.", 4: "RIGHT"}
    raw = tmp_path / "vqarad-no_cond_desc-raw-ck.csv"
    rows = _raw_file(raw, llama3_tok, answers)
    asked = []

    def chat(messages, die_at=None):
        (m,) = messages
        i = int(m["content"].split("finding ")[1].split("?")[0])
        if i == die_at:
            raise KeyboardInterrupt
        asked.append(m["content"])
        return replies[i]

    with pytest.raises(KeyboardInterrupt):
        eval_vqa(lambda m: chat(m, die_at=3), raw, 4, progress=False)
    assert len(read_csv_rows(tmp_path / "vqarad-no_cond_desc-raw-ck-70B_4bit.partial.csv")) == 3
    res = eval_vqa(chat, raw, 4, progress=False)
    assert len(asked) == 5  # rows 0-2 once, then 3-4: nothing judged twice
    assert asked[0] == judge_prompt("Is there finding 0?", "Yes.", "yes")
    judged = read_csv_rows(res["path"])
    # The reference's judged file: image, the prompt the judge saw, its reply; UTF-8 with BOM.
    assert list(judged[0]) == ["image", "instruction", "generated"]
    assert Path(res["path"]).read_bytes().startswith(b"\xef\xbb\xbf")
    assert [r["generated"] for r in judged] == [replies[i] for i in range(5)]
    assert [r["image"] for r in judged] == [r["image"] for r in rows]
    assert [r["instruction"] for r in judged] == [judge_prompt(f"Is there finding {i}?", g, o) for i, (g, o) in enumerate(answers)]
    assert [is_right(r["generated"]) for r in judged] == [1, 0, 1, 0, 1]
    # 3/5 -> round(0.6, 5) = 0.6: the reference's name.
    assert Path(res["path"]).name == "vqarad-no_cond_desc-raw-ck-70B_4bit-0.6.csv"


def test_chat_loop_keeps_the_conversation_and_quits_on_q():
    inputs = iter(["hello", "", "and now?", "q", "never read"])
    printed = []
    seen = []

    def chat(messages):
        seen.append([m["content"] for m in messages])
        return f"reply {len(messages)}"

    msgs = chat_loop(chat, input_fn=lambda _: next(inputs), print_fn=printed.append)
    assert seen == [["hello"], ["hello", "reply 1", "and now?"]]
    assert printed == ["Assistant: reply 1", "Assistant: reply 3"]
    assert len(msgs) == 4


@pytest.mark.slow
def test_tiny_4bit_judge_end_to_end(judge_dir, llama3_tok, tmp_path, monkeypatch, capsys):
    judge = Judge(str(judge_dir), bit=4, max_new_tokens=3)
    import bitsandbytes as bnb

    assert isinstance(judge.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    tok_ids = judge.tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert judge.stop_ids == tok_ids  # stops at eos and at <|eot_id|>
    assert judge.chat([{"role": "user", "content": "Respond with only RIGHT or WRONG"}]) == "RIGHT RIGHT RIGHT"
    raw = tmp_path / "omni-raw.csv"
    _raw_file(raw, llama3_tok, [("a", "b"), ("c", "c")])
    # The script itself, as documented.
    monkeypatch.setattr(sys, "argv", ["tools/judge.py", "--exp", "eval_vqa", "--csv-path", str(raw),
                                      "--model-path", str(judge_dir), "--bit", "4", "--max-new-tokens", "2", "--no-progress"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "tools" / "judge.py"), run_name="__main__")
    assert e.value.code == 0
    out = tmp_path / "omni-raw-70B_4bit-1.0.csv"
    assert [r["generated"] for r in read_csv_rows(out)] == ["RIGHT RIGHT", "RIGHT RIGHT"]
    assert "accuracy: 1.00000" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        judge_main(["--exp", "eval_vqa"])
    assert "needs --csv-path" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the older spelling still reaches the same option
        judge_main(["--exp", "eval_vqa", "--csv_path", str(tmp_path / "none.csv")])
    assert "none.csv' does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="judge model folder"):
        Judge(str(tmp_path / "no_model"), bit=4)


def test_a_run_into_a_log_file_writes_no_carriage_return(llama3_tok, tmp_path):
    """stdout and stderr are pipes (a job's log), not a terminal: progress comes as plain
    lines, never a bar redrawn with ``\\r``."""
    import subprocess
    import textwrap

    raw = tmp_path / "vqarad-no_cond_desc-raw-ck.csv"
    _raw_file(raw, llama3_tok, [("Yes.", "yes"), ("No", "yes"), ("left", "left")])
    script = textwrap.dedent(f"""
        from medcap.eval import judge_main

        class Judge:
            def __init__(self, path, bit, max_new_tokens):
                pass

            def chat(self, messages):
                return "RIGHT"

        raise SystemExit(judge_main(["--exp", "eval_vqa", "--csv-path", {str(raw)!r}], judge_factory=Judge))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"\r" not in done.stdout + done.stderr
    assert b"judging: 3/3" in done.stderr  # the progress, as a line
    assert b"accuracy: 1.00000 (3/3)" in done.stdout
