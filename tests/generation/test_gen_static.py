"""The batched, KV-cached engine against the slow reference path (batch 1, no cache,
full recompute per token), and its cache handling."""

from __future__ import annotations

import pytest
import torch

import medcap.generation._static as gen_mod
from medcap.generation import build_prompt, generate
from medcap.generation._sampling import make_generators, row_seed
from medcap.generation._static import generate_reference, left_pad, prefill

QUESTIONS = [
    "What is it?",
    "Describe the lesion in the upper lobe of the right lung, please, in some detail.",
    "Hi",
    "Is there a fracture of the left femur visible on this radiograph?",
    "Size?",
]
HAS_IMAGE = [True, False, True, True, False]
BUDGETS = [9, 5, 14, 7, 11]


def _prompts(tok, n_img_tokens=4):
    return [build_prompt(tok, q, num_image_tokens=n_img_tokens, has_image=h) for q, h in zip(QUESTIONS, HAS_IMAGE)]


def _row_images(images):
    """Per-row image (or None) and the stacked batch tensor, in prompt order."""
    rows, k = [], 0
    for h in HAS_IMAGE:
        rows.append(images[k] if h else None)
        k += int(h)
    return rows, images[:k]


def _reference(model, tok, prompts, rows, budgets, **kw):
    return [
        generate_reference(model, tok, p, im, max_new_tokens=m, **kw) for p, im, m in zip(prompts, rows, budgets)
    ]


LONG = 16  # budget of the shared slow reference run; a greedy run with budget m <= LONG is its prefix


@pytest.fixture(scope="module")
def greedy_ref(gen_model, gen_tok, gen_images):
    """The slow path's greedy output of every row with budget LONG (computed once: it is slow)."""
    rows, _ = _row_images(gen_images)
    return _reference(gen_model, gen_tok, _prompts(gen_tok), rows, [LONG] * len(QUESTIONS))


def test_prompts_have_varying_lengths(gen_tok):
    lengths = {len(p) for p in _prompts(gen_tok)}
    assert len(lengths) == len(QUESTIONS)


def test_cached_batched_greedy_equals_slow_reference(gen_model, gen_tok, gen_images, greedy_ref):
    prompts = _prompts(gen_tok)
    _, batch_images = _row_images(gen_images)
    fast = generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=BUDGETS)
    slow = [r[:m] for r, m in zip(greedy_ref, BUDGETS)]
    assert fast == slow
    assert [len(x) for x in fast] == [len(x) for x in slow]
    assert all(len(x) > 0 for x in fast)


def test_text_only_batch_equals_reference(gen_model, gen_tok):
    prompts = [build_prompt(gen_tok, q, num_image_tokens=4, has_image=False) for q in QUESTIONS[:3]]
    fast = generate(gen_model, gen_tok, prompts, None, max_new_tokens=6)
    slow = [generate_reference(gen_model, gen_tok, p, None, max_new_tokens=6) for p in prompts]
    assert fast == slow


def test_prefill_matches_full_forward_and_sees_the_image(gen_model, gen_tok, gen_images):
    """Left padding + padding masks + shifted positions give each row exactly the logits
    of an unpadded forward pass of that row alone."""
    prompts = _prompts(gen_tok)
    rows, batch_images = _row_images(gen_images)
    tokens, pad_mask = left_pad(prompts, gen_tok.pad_id)
    cache_len = tokens.shape[1] + 3
    gen_model.setup_caches(len(prompts), torch.float32, decoder_max_seq_len=cache_len)
    try:
        with torch.no_grad():
            last = prefill(gen_model, tokens, pad_mask, batch_images, cache_len)  # [b, V]
    finally:
        gen_mod.delete_kv_caches(gen_model)
    with torch.no_grad():
        for i, (p, im) in enumerate(zip(prompts, rows)):
            alone = gen_model(torch.tensor([p]), images=None if im is None else im[None])[0, -1]
            torch.testing.assert_close(last[i], alone, atol=1e-4, rtol=1e-4)
        # A different image changes the prediction: the image reaches the decoder.
        other = gen_model(torch.tensor([prompts[0]]), images=gen_images[5:6])[0, -1]
        assert (other - last[0]).abs().max() > 1e-3


def test_per_row_stop_tokens_and_finished_rows_leave_the_batch(gen_model, gen_tok, gen_images, greedy_ref, monkeypatch):
    prompts = _prompts(gen_tok)
    _, batch_images = _row_images(gen_images)
    budgets = [LONG] * len(prompts)
    # Stop on a token that ends some rows early and not others; the expected rows are
    # the slow path's, cut before the first stop token.
    candidates = [t for r in greedy_ref for t in r[1:6] if any(t not in other for other in greedy_ref)]
    assert candidates, "the test needs a token some rows make early and others never"
    extra = candidates[0]
    stop = list(gen_tok.stop_tokens) + [extra]  # greedy_ref already stopped at the usual ones
    expect = [r[: r.index(extra)] if extra in r else r for r in greedy_ref]
    assert expect != greedy_ref  # the extra stop token ends a row early ...
    assert len({len(e) for e in expect}) > 1  # ... and rows end at different steps
    compactions = []
    real = gen_mod._compact_caches
    monkeypatch.setattr(gen_mod, "_compact_caches", lambda m, keep: (compactions.append(keep.numel()), real(m, keep)))
    got = generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=budgets, stop_tokens=stop)
    assert got == expect
    assert compactions and min(compactions) < len(prompts)


def test_sampling_is_per_row_and_matches_reference(gen_model, gen_tok, gen_images):
    prompts = _prompts(gen_tok)
    rows, batch_images = _row_images(gen_images)
    seeds = [row_seed(7, f"row{i}") for i in range(len(prompts))]
    kw = dict(temperature=0.9, top_k=40)
    budgets = [min(b, 6) for b in BUDGETS]
    fast = generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=budgets, generators=make_generators(seeds), **kw)
    slow = [
        generate_reference(gen_model, gen_tok, p, im, max_new_tokens=m, generator=make_generators([s])[0], **kw)
        for p, im, m, s in zip(prompts, rows, budgets, seeds)
    ]
    assert fast == slow
    # A row's samples do not depend on its batch companions.
    alone = generate(gen_model, gen_tok, prompts[3:4], gen_images[2:3], max_new_tokens=budgets[3],
                     generators=make_generators(seeds[3:4]), **kw)
    assert alone[0] == fast[3]
    # Another seed draws something else, and greedy differs from sampling.
    other = generate(gen_model, gen_tok, prompts[3:4], gen_images[2:3], max_new_tokens=budgets[3],
                     generators=make_generators([seeds[3] + 1]), **kw)
    assert other[0] != fast[3]


def test_cache_is_sized_to_the_batch_and_removed(gen_model, gen_tok, gen_images, monkeypatch):
    prompts = _prompts(gen_tok)
    _, batch_images = _row_images(gen_images)
    seen = []
    real = gen_model.setup_caches

    def spy(batch_size, dtype, *, decoder_max_seq_len=None):
        seen.append((batch_size, decoder_max_seq_len))
        real(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)

    monkeypatch.setattr(gen_model, "setup_caches", spy)
    generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=BUDGETS)
    assert seen == [(len(prompts), max(map(len, prompts)) + max(BUDGETS))]
    assert seen[0][1] < gen_model.decoder.max_seq_len
    assert not gen_model.caches_are_setup()


def test_zero_budget_rows_and_bad_inputs(gen_model, gen_tok, gen_images, greedy_ref):
    prompts = _prompts(gen_tok)
    _, batch_images = _row_images(gen_images)
    budgets = [0, 4, 0, 6, 3]
    got = generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=budgets)
    assert got == [r[:m] for r, m in zip(greedy_ref, budgets)]
    assert got[0] == [] and got[2] == []
    with pytest.raises(ValueError, match="image"):
        generate(gen_model, gen_tok, prompts, batch_images[:1], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=gen_model.decoder.max_seq_len)
    with pytest.raises(ValueError, match="seed"):
        generate(gen_model, gen_tok, prompts, batch_images, max_new_tokens=3, temperature=0.5)
