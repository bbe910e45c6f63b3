"""Make the small local assets the tiny training configs run on (seconds, on a CPU).

    python -m medcap.training.tiny_assets /tmp/medcap-tiny [--samples 8] [--bad 0]

writes, under the folder:

* ``llm/``: a byte-level tiktoken tokenizer (``original/tokenizer.model`` with
  remapped special tokens) and a Llama-3.1-architecture model in Hugging Face
  format (``model.safetensors``), random but seeded: what
  ``recipes/configs/tiny/*.yaml`` name with ``assets_dir``;
* ``data/train.json``: sharegpt records with synthetic images, in the
  reference's layout (50 ``①`` placeholders, ``meta: dir=...``); ``--bad N``
  appends N broken records (missing image, unreadable image) to exercise the
  bad-sample accounting.

Then: ``medcap run full_finetune_single_device --config tiny/full_finetune_single_device assets_dir=/tmp/medcap-tiny``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from medcap.testing import PLACEHOLDER_CHAR, make_caption_dataset, make_tiny_llm

# The sizes recipes/configs/tiny/*.yaml assume (medcap_tiny's defaults).
TINY_VOCAB_SIZE = 268  # 256 byte tokens + 12 special tokens; <|image|> = 268, outside the vocabulary


def add_bad_records(train_json: Path, n_bad: int) -> None:
    """Append ``n_bad`` records that cannot become samples (alternating: image file
    missing, image file not an image)."""
    records = json.loads(train_json.read_text())
    img_dir = train_json.parent / "images"
    for k in range(n_bad):
        if k % 2 == 0:
            rel = f"missing_{k:03d}.png"
        else:
            rel = f"corrupt_{k:03d}.png"
            (img_dir / rel).write_bytes(b"this is not a PNG file")
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": PLACEHOLDER_CHAR * 50},
                    {"from": "gpt", "value": "A broken record."},
                ],
                "image": rel,
                "meta": f"dir={img_dir}",
            }
        )
    train_json.write_text(json.dumps(records, indent=1))


def make_tiny_training_assets(
    out_dir: str | Path, *, samples: int = 8, bad: int = 0, seed: int = 0, name: str = "train.json"
) -> Dict[str, Any]:
    """Write the tiny LLM, tokenizer and a sharegpt dataset; returns their paths and
    ``overrides`` (``key=value`` strings naming them for a tiny config)."""
    out = Path(out_dir)
    llm = make_tiny_llm(out / "llm", seed=seed)
    if llm["model_kwargs"]["vocab_size"] != TINY_VOCAB_SIZE:  # the configs hard-code it
        raise RuntimeError(f"tiny vocabulary is {llm['model_kwargs']['vocab_size']}, configs expect {TINY_VOCAB_SIZE}")
    train_json = make_caption_dataset(out / "data", samples, seed=seed, name=name)
    if bad:
        add_bad_records(train_json, bad)
    return {
        "assets_dir": str(out),
        "tokenizer_path": llm["tokenizer_path"],
        "special_tokens_path": llm["special_tokens_path"],
        "checkpoint_dir": llm["checkpoint_dir"],
        "checkpoint_files": llm["checkpoint_files"],
        "train_json": str(train_json),
        "model_kwargs": llm["model_kwargs"],
        "overrides": [f"assets_dir={out}"],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medcap.training.tiny_assets", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--samples", type=int, default=8, help="good samples (default 8)")
    p.add_argument("--bad", type=int, default=0, help="broken records to append (default 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = make_tiny_training_assets(args.out_dir, samples=args.samples, bad=args.bad, seed=args.seed)
    print(f"tiny assets in {info['assets_dir']}; pass: {' '.join(info['overrides'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
