"""What the record, token, bad-sample and dataset tests share: a small image chat dataset
made on the spot, the tokens its Llama 3 template should give (written out by hand for the
byte-level tokenizer of conftest.py), and records broken in every way the parser refuses."""

from __future__ import annotations

from medcap.data import image_chat_dataset

N = 4  # image tokens in these tests
S = 16  # image side


def _bytes(text: str):
    return list(text.encode("utf-8"))


def expected_tokens(special, turns, n_img=N):
    """Tokens of the Llama 3 template, written out by hand for a byte-level tokenizer.

    ``turns``: (role, [pieces]) with pieces str (text bytes) or None (the image run).
    """
    out = [special["<|begin_of_text|>"]]
    for role, pieces in turns:
        out += [special["<|start_header_id|>"]] + _bytes(role) + [special["<|end_header_id|>"]] + _bytes("\n\n")
        for p in pieces:
            out += [special["<|image|>"]] * n_img if p is None else _bytes(p)
        out.append(special["<|eot_id|>"])
    return out + [special["<|end_of_text|>"]]


def make_dataset(tok, tmp_path, dh, records, jsonl=False, **kw):
    dh.save_rgb(tmp_path / "img" / "img.png", 20, 12)
    path = dh.write_records(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, tmp_path / "img", jsonl=jsonl)
    kw.setdefault("num_image_tokens", N)
    kw.setdefault("image_size", S)
    return image_chat_dataset(tok, source=str(path), **kw)


BAD = {
    "not an object": (["a", "list"], "malformed record"),
    "no conversations": ({"image": "img.png", "meta": "__dir__"}, "malformed record"),
    "conversations not a list": ({"conversations": "hi"}, "malformed record"),
    "empty conversations": ({"conversations": []}, "malformed record"),
    "message without value": ({"conversations": [{"from": "human"}]}, "malformed record"),
    "unknown role": ({"conversations": [{"from": "robot", "value": "x"}]}, "malformed record"),
    "value not a string": ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "malformed record"),
    "no assistant turn": ({"conversations": [{"from": "human", "value": "x"}]}, "malformed record"),
    "empty assistant": ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]}, "malformed record"),
    "no user turn": ({"conversations": [{"from": "gpt", "value": "x"}]}, "malformed record"),
    "two markers": ({"conversations": [{"from": "human", "value": "<image> and \u2460\u2460"}, {"from": "gpt", "value": "a"}],
                     "image": "img.png", "meta": "__dir__"}, "malformed record"),
    "two images": ({**{"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
                    "image": ["img.png", "img.png"], "meta": "__dir__"}, "malformed record"),
    "image not a string": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                            "image": 7, "meta": "__dir__"}, "malformed record"),
    "meta not key=value": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                            "image": "img.png", "meta": "nodir"}, "malformed record"),
    "marker without image": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
                             "marker without image"),
    "marker, empty meta": ({"conversations": [{"from": "human", "value": "\u2460" * 50}, {"from": "gpt", "value": "a"}],
                           "image": "img.png", "meta": ""}, "marker without image"),
    "missing image file": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                           "image": "nope.png", "meta": "__dir__"}, "image not found"),
}
