#!/usr/bin/env python
"""The LLM judge and chat tool (the reference's chat_llama3_quant.py).

    python tools/judge.py --exp chat [--model-path LLAMA70B] [--bit 4|8]
    python tools/judge.py --exp eval_vqa --csv-path RESULTS/vqarad-no_cond_desc-raw-CKPT.csv [--bit 4|8]
    python tools/judge.py --exp eval_vqa --csv-path RAW.csv --endpoint http://127.0.0.1:8000/v1 --judge-model NAME

Loads a local Hugging Face chat model (default ./models/llama3/Meta-Llama-3.1-70B-Instruct)
with bitsandbytes in 4 bit (nf4, double quantisation, bf16 compute) or 8 bit, device_map=auto,
local files only; greedy, up to 200 new tokens. ``eval_vqa`` asks, for each row, whether our
answer is right and writes RAW-70B_{bit}bit-{np.round(accuracy, 5)}.csv next to RAW.csv (resumable).
With --endpoint, an OpenAI-compatible server (medcap serve, vLLM, a hosted model) judges instead,
with the same prompt, rule and file. The logic lives in medcap/eval/_judge.py. The older ``--snake_case`` spellings
of the flags still work.
"""

import sys

from medcap.cli import quiet_broken_pipe
from medcap.eval import judge_main

if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(judge_main))
