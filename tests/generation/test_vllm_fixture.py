"""The vLLM backend's parts that need no vLLM: what we send is checked before any call, and
the native engine reproduces the greedy tokens and log-probs vLLM gave for a seeded tiny
model (``tests/fixtures/vllm_greedy.json``, recorded by ``tests/fixtures/vllm_tiny.py record``)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

from medcap.generation import GenerationEngine
from medcap.generation._vllm import (
    LlmFolder,
    PromptEmbedsError,
    VllmClient,
    VllmError,
    check_model_matches,
    check_prompt_embeds,
    check_sampling,
    check_stop_ids,
    encode_embeds,
    llm_folder,
    prompt_embeds,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("vllm_tiny", FIXTURES / "vllm_tiny.py")
vt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vt)

# vLLM (float32, its CPU kernels) vs our float32 forward: recorded differences are ~1e-6.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def fixture():
    return json.loads((FIXTURES / "vllm_greedy.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return vt.build(tmp_path_factory.mktemp("vllm_tiny") / "llm")


def test_rebuilt_model_and_prompts_are_the_recorded_ones(fixture, tiny):
    assert fixture["seed"] == vt.SEED and fixture["sizes"] == vt.SIZES
    assert tiny["weights_sha256"] == fixture["weights_sha256"], "the seeded LLM weights changed: re-record the fixture"
    assert tiny["vision_sha256"] == fixture["vision_sha256"], "the seeded vision weights changed: re-record the fixture"
    assert list(tiny["tokenizer"].stop_tokens) == fixture["stop_token_ids"]
    rows = vt.prompt_rows(tiny)
    assert [r["tokens"] for r in rows] == [r["prompt_tokens"] for r in fixture["rows"]]
    for r, rec in zip(rows, fixture["rows"]):
        e = prompt_embeds(tiny["model"], r["tokens"], r["image"])
        assert float(e.double().sum()) == pytest.approx(rec["embeds_sum"], rel=1e-5, abs=1e-4)


def test_native_greedy_tokens_equal_vllm_fixture(fixture, tiny, one_thread):
    rows = vt.prompt_rows(tiny)
    eng = GenerationEngine(tiny["model"], tiny["tokenizer"], batch_size=len(rows))
    got = eng.generate_tokens([r["tokens"] for r in rows], [r["image"] for r in rows], fixture["max_new_tokens"],
                              [r["key"] for r in rows])
    want = [r["tokens"] for r in fixture["rows"]]
    diffs = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not diffs, f"rows {diffs} differ from vLLM's: native {[got[i] for i in diffs]} vs {[want[i] for i in diffs]}"
    assert {r["finish_reason"] for r in fixture["rows"]} == {"stop", "length"}


def test_native_logprobs_match_vllm_fixture(fixture, tiny, one_thread):
    worst = 0.0
    for r, rec in zip(vt.prompt_rows(tiny), fixture["rows"]):
        e = prompt_embeds(tiny["model"], r["tokens"], r["image"])
        ref = vt.native_logprobs(tiny["model"], e, rec["tokens"])  # [n, vocab]
        assert len(rec["top_logprobs"]) == len(rec["tokens"])
        for j, step in enumerate(rec["top_logprobs"]):
            ids = [int(k) for k in step]
            assert ids[0] == rec["tokens"][j]  # greedy: vLLM's top entry is its token
            assert ref[j].topk(len(ids)).indices.tolist() == ids  # same top-k, same order
            worst = max(worst, max(abs(float(ref[j, int(k)]) - v) for k, v in step.items()))
    assert worst <= LOGPROB_TOL


def test_comparison_notices_another_model(fixture, tiny, one_thread):
    """The fixture pins the weights: a slightly different vision side changes image rows."""
    rows = vt.prompt_rows(tiny)
    model = tiny["model"]
    saved = {k: v.clone() for k, v in model.vision.state_dict().items()}
    try:
        with torch.no_grad():
            model.vision.projector[2].bias.add_(0.5)
        got = GenerationEngine(model, tiny["tokenizer"], batch_size=len(rows)).generate_tokens(
            [r["tokens"] for r in rows], [r["image"] for r in rows], fixture["max_new_tokens"], [r["key"] for r in rows])
    finally:
        model.vision.load_state_dict(saved)
    same = [a == b["tokens"] for a, b in zip(got, fixture["rows"])]
    assert same[2]  # the text-only row does not see the vision side
    assert not all(same[i] for i, r in enumerate(fixture["rows"]) if r["image"] is not None)


# ---- What we send, checked before any call -------------------------------------------


@pytest.mark.parametrize(
    "embeds, match",
    [
        (torch.zeros(5, 63), "width 63 != the LLM's hidden size 64"),
        (torch.zeros(1, 5, 64), r"2-D \[seq, 64\], got shape \(1, 5, 64\)"),
        (torch.zeros(64), r"2-D \[seq, 64\], got shape \(64,\)"),
        (torch.zeros(0, 64), "empty"),
        (torch.zeros(5, 64, dtype=torch.long), "torch.int64 is not a float dtype"),
        (torch.full((5, 64), float("nan")), "NaN or inf"),
        (torch.tensor([[float("inf")] * 64]), "NaN or inf"),
        ([[0.0] * 64], "must be a torch.Tensor"),
    ],
)
def test_embeds_validator_refuses(embeds, match):
    with pytest.raises(PromptEmbedsError, match=match) as e:
        check_prompt_embeds(embeds, 64, index=3)
    assert "\n" not in str(e.value) and str(e.value).startswith("prompt 3:")


def test_embeds_validator_accepts_float_dtypes():
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        check_prompt_embeds(torch.zeros(3, 64, dtype=dt), 64)


def test_stop_ids_validator():
    assert check_stop_ids([1, torch.tensor(2), 267], 268) == [1, 2, 267]
    for bad, match in (([268], r"outside the vocabulary \[0, 268\)"), ([-1], "outside"), ([1.5], "not an integer"),
                       ([True], "not an integer"), (["7"], "not an integer"), ([], "no stop token ids")):
        with pytest.raises(PromptEmbedsError, match=match):
            check_stop_ids(bad, 268)


def test_sampling_validator():
    check_sampling(1, 0.0, None)
    for args, match in (((0, 0.0, None), "max_tokens"), ((4, -0.1, None), "temperature"),
                        ((4, float("nan"), None), "temperature"), ((4, 1.0, 0), "top_k")):
        with pytest.raises(PromptEmbedsError, match=match):
            check_sampling(*args)


def test_client_checks_everything_before_any_call(tiny):
    """Nothing listens on the client's URL: a refusal is ours (PromptEmbedsError), a call is VllmError."""
    folder = llm_folder(tiny["llm_dir"])
    client = VllmClient("http://127.0.0.1:9", folder, max_model_len=64, timeout=5)
    good = torch.zeros(10, 64)
    stops = list(tiny["tokenizer"].stop_tokens)
    cases = [
        (dict(embeds=[good, torch.zeros(10, 65)]), "prompt 1: prompt_embeds width 65"),
        (dict(embeds=[good.double().fill_(float("nan"))]), "NaN"),
        (dict(embeds=[good], stop_token_ids=[folder.vocab_size]), "outside the vocabulary"),
        (dict(embeds=[good], max_tokens=55), "exceed max_model_len 64"),
        (dict(embeds=[good, good], max_tokens=[4]), "2 prompts but 1 max_tokens"),
        (dict(embeds=[good], temperature=-1.0), "temperature"),
    ]
    for kw, match in cases:
        args = {"max_tokens": 4, "stop_token_ids": stops, **kw}
        with pytest.raises(PromptEmbedsError, match=match):
            client.complete(args.pop("embeds"), **args)
    with pytest.raises(VllmError, match="did not answer") as e:  # valid: it does try the server
        client.complete([good], max_tokens=4, stop_token_ids=stops)
    assert "\n" not in str(e.value)


def test_wire_format_round_trip():
    """base64 of torch.save bytes, read back the way vLLM reads it (weights_only, validated base64)."""
    e = torch.randn(7, 64)
    for dtype in (None, torch.bfloat16):
        payload = base64.b64decode(encode_embeds(e, dtype), validate=True)
        back = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        assert back.shape == (7, 64) and back.dtype == (dtype or torch.float32)
        assert torch.equal(back, e if dtype is None else e.to(dtype))
    view = torch.randn(64, 7).t()  # a non-contiguous view is sent as its own values
    assert torch.equal(torch.load(io.BytesIO(base64.b64decode(encode_embeds(view))), weights_only=True), view)


def test_llm_folder_and_model_checks(tiny, tmp_path):
    f = llm_folder(tiny["llm_dir"])
    assert (f.hidden_size, f.vocab_size, f.max_position_embeddings, f.head_dim) == (64, 268, 256, 32)
    check_model_matches(tiny["model"], f)
    with pytest.raises(ValueError, match="not the same LLM"):
        check_model_matches(tiny["model"], LlmFolder(f.path, 128, 268, 256, 64))
    with pytest.raises(FileNotFoundError, match="config.json"):
        llm_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "hidden_size": 8}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        llm_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not LlamaForCausalLM"):
        llm_folder(tmp_path)


def test_prompt_embeds_splices_the_image(tiny):
    rows = vt.prompt_rows(tiny)
    r = rows[0]
    e = prompt_embeds(tiny["model"], r["tokens"], r["image"])
    t = torch.tensor(r["tokens"])
    is_img = t == tiny["model"].image_token_id
    assert e.shape == (len(r["tokens"]), 64) and int(is_img.sum()) == vt.NUM_IMAGE_TOKENS
    text = tiny["model"].tok_embeddings(t[~is_img])
    assert torch.equal(e[~is_img], text)
    img = tiny["model"].vision(r["image"].unsqueeze(0))[0]  # [T, d]
    assert torch.allclose(e[is_img], img)
    with pytest.raises(Exception, match="placeholder"):
        prompt_embeds(tiny["model"], r["tokens"], None)  # placeholders without an image
