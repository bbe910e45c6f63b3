"""The exported folder's tokenizer and chat template: the same token ids as medcap's.

    chat_template          Llama 3's chat format, the image marker expanded into its placeholders
    convert_tokenizer      a tiktoken ``tokenizer.model`` + medcap's special ids -> a ``tokenizers``
                           tokenizer (transformers' tiktoken converter; every special id checked)
    write_tokenizer_files  tokenizer.json, tokenizer_config.json, chat_template.jinja, original/
    check_prompt_ids       the written tokenizer and template against medcap's own prompts

The template writes each turn as ``<|start_header_id|>role<|end_header_id|>\\n\\n`` + the
stripped text + ``<|eot_id|>`` after ``<|begin_of_text|>``, and ``<image>`` (or an image
part) as the run of ``<|image|>`` placeholders; a text around special tokens is encoded
piece by piece, which is what medcap's tokenizer does turn by turn, so the ids agree
(checked on every export by ``check_prompt_ids``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

from medcap._io import EXPORT_SPECIAL_TOKENS, EXPORT_TOKENIZER

IMAGE_TOKEN = "<|image|>"

_TEMPLATE = """{#- medcap's prompt format: Llama 3's chat template; <image> (or an image part) is the image -#}
{%- set image_run = '<|image|>' * NUM_IMAGE_TOKENS -%}
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
  {%- if message['content'] is string -%}
    {%- set text = message['content'] -%}
  {%- else -%}
    {%- set ns = namespace(parts=[]) -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}
        {%- set ns.parts = ns.parts + ['<image>'] -%}
      {%- elif part['type'] == 'text' -%}
        {%- set ns.parts = ns.parts + [part['text'] | trim] -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set text = ns.parts | join('\\n\\n') -%}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- set text = text | replace('<image>', image_run) -%}
  {%- endif -%}
  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (text | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""


def chat_template(num_image_tokens: int) -> str:
    return _TEMPLATE.replace("NUM_IMAGE_TOKENS", str(int(num_image_tokens)))


# ---- The tokenizer


def convert_tokenizer(tiktoken_path: str, special_tokens: Dict[str, int]):
    """A ``tokenizers.Tokenizer`` of the tiktoken BPE with medcap's special tokens at their ids."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    fast = TikTokenConverter(vocab_file=str(tiktoken_path)).converted()
    base = fast.get_vocab_size(with_added_tokens=False)
    by_id = {token_id: name for name, token_id in special_tokens.items()}
    if min(by_id) < base:
        raise ValueError(f"special token {by_id[min(by_id)]} has id {min(by_id)}, inside the BPE vocabulary of {base}")
    # ids are handed out in order: an id medcap's tokenizer leaves unused (Llama 3's 128011) gets a
    # token of its own that no text produces, so that every later id stays where medcap has it
    for token_id in range(base, max(by_id) + 1):
        name = by_id.get(token_id, f"<|medcap_unused_{token_id}|>")
        fast.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if fast.token_to_id(name) != token_id:
            raise ValueError(f"special token {name} got id {fast.token_to_id(name)}, not medcap's {token_id}")
    return fast


def write_tokenizer_files(out: Path, tokenizer: Any, paths: Dict[str, str], *, num_image_tokens: int,
                          max_length: int) -> List[str]:
    """Write the tokenizer files of the folder; ``paths``: medcap's ``path`` (+ ``special_tokens_path``)."""
    names = {v: k for k, v in tokenizer.special_tokens.items()}
    fast = convert_tokenizer(paths["path"], tokenizer.special_tokens)
    fast.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tokenizer.bos_id], "eos_token": names[tokenizer.eot_id],
        "pad_token": names[tokenizer.pad_id],
        "padding_side": "left", "clean_up_tokenization_spaces": False, "model_max_length": int(max_length),
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(chat_template(num_image_tokens), encoding="utf-8")
    # medcap's own tokenizer files, where a Llama folder keeps them (medcap reads the folder back)
    (out / EXPORT_TOKENIZER).parent.mkdir(exist_ok=True)
    written = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", EXPORT_TOKENIZER]
    shutil.copyfile(paths["path"], out / EXPORT_TOKENIZER)
    if paths.get("special_tokens_path"):
        shutil.copyfile(paths["special_tokens_path"], out / EXPORT_SPECIAL_TOKENS)
        written.append(EXPORT_SPECIAL_TOKENS)
    return written


# ---- The check


_SAMPLES = [None, "Is there a fracture?", "  What does (1) mean here?\nAnswer briefly.  ",
            "Modality: which one? [urgent]"]


def check_prompt_ids(out: Path, tokenizer: Any, num_image_tokens: int) -> int:
    """The written tokenizer + template must give medcap's prompt ids (captions, questions, a
    second turn); a difference stops the export. Returns the number of prompts compared."""
    from transformers import PreTrainedTokenizerFast

    from medcap.generation import build_prompt, question_messages

    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    template = (out / "chat_template.jinja").read_text(encoding="utf-8")
    conversations = [question_messages(q) for q in _SAMPLES]
    conversations.append(question_messages("What is shown?") + [
        {"role": "assistant", "content": "A CT scan."}, {"role": "user", "content": "Where is the lesion?"}])
    for messages in conversations:
        ours = build_prompt(tokenizer, messages, num_image_tokens=num_image_tokens)
        text = fast.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        theirs = fast(text, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise ValueError(f"the exported tokenizer and chat template do not give medcap's prompt ids for "
                             f"{messages!r} (first difference at token {first}: {ours[first:first + 5]} vs "
                             f"{theirs[first:first + 5]})")
    return len(conversations)
