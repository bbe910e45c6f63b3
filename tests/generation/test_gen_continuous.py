"""Continuous batching: the same tokens as the static path and the slow no-cache path,
whatever the slot a row lands in, its neighbours, or when it was submitted."""

from __future__ import annotations

import pytest
import torch

from medcap.generation import GenerationEngine, build_prompt
from medcap.generation._continuous import ContinuousBatcher
from medcap.generation._sampling import make_generators, row_seed
from medcap.generation._static import generate, generate_reference

QUESTIONS = [
    "What is it?",
    "Describe the lesion in the upper lobe of the right lung, please, in some detail and at length.",
    "Hi",
    "Is there a fracture of the left femur visible on this radiograph?",
    "Size?",
    "Which organ?",
    "Tell me everything about the heart shadow, the mediastinum and both hila in this chest film.",
]
HAS_IMAGE = [True, False, True, True, False, True, True]
BUDGETS = [1, 14, 3, 12, 2, 9, 5]  # very different lengths: slots free up at different steps
KEYS = [f"q{i}" for i in range(len(QUESTIONS))]


def _inputs(tok, images):
    prompts = [build_prompt(tok, q, num_image_tokens=4, has_image=h) for q, h in zip(QUESTIONS, HAS_IMAGE)]
    rows = [images[i % len(images)] if h else None for i, h in enumerate(HAS_IMAGE)]
    return prompts, rows


def _cut(rows, stop):
    return [next((r[:i] for i, t in enumerate(r) if t in stop), r) for r in rows]


@pytest.fixture(scope="module")
def slow_greedy(gen_model, gen_tok, gen_images):
    """The slow path, no stop token: every row runs to its budget."""
    prompts, rows = _inputs(gen_tok, gen_images)
    return [generate_reference(gen_model, gen_tok, p, im, max_new_tokens=m, stop_tokens=[])
            for p, im, m in zip(prompts, rows, BUDGETS)]


def test_rows_of_very_different_lengths_equal_static_and_slow_paths(gen_model, gen_tok, gen_images, slow_greedy):
    prompts, rows = _inputs(gen_tok, gen_images)
    assert [len(x) for x in slow_greedy] == BUDGETS
    batcher = ContinuousBatcher(gen_model, [], slots=3, cache_len=160)
    reqs = [batcher.submit(p, im, m) for p, im, m in zip(prompts, rows, BUDGETS)]
    batcher.run_until_done()
    assert [r.tokens for r in reqs] == slow_greedy
    static_stats = {}
    for lo in range(0, len(prompts), 3):
        imgs = [im for im in rows[lo:lo + 3] if im is not None]
        out = generate(gen_model, gen_tok, prompts[lo:lo + 3], torch.stack(imgs), max_new_tokens=BUDGETS[lo:lo + 3],
                       stop_tokens=[], stats=static_stats)
        assert out == slow_greedy[lo:lo + 3]
    # 7 rows through 3 slots: newcomers were prefilled while others decoded, and the
    # static batches each run to their longest row: 14, 12 and 5 tokens (the first
    # token of each comes from the prefill)
    assert batcher.stats["prefill_passes"] >= 3
    assert static_stats["decode_passes"] == 13 + 11 + 4
    assert batcher.stats["decode_passes"] < static_stats["decode_passes"]
    # once nothing waits, idle slots are dropped (eager): fewer slot-steps than 3 per pass
    assert batcher.stats["slot_steps"] < 3 * batcher.stats["decode_passes"]


def test_engine_greedy_equals_static_and_slow_paths(gen_model, gen_tok, gen_images, slow_greedy):
    prompts, rows = _inputs(gen_tok, gen_images)
    expect = _cut(slow_greedy, set(gen_tok.stop_tokens))  # the tokenizer's stop tokens end rows early
    assert len({len(x) for x in expect}) > 2
    cont = GenerationEngine(gen_model, gen_tok, batch_size=3)
    static = GenerationEngine(gen_model, gen_tok, batch_size=3, continuous=False)
    assert cont.generate_tokens(prompts, rows, BUDGETS, KEYS) == expect
    assert static.generate_tokens(prompts, rows, BUDGETS, KEYS) == expect
    assert cont.last_stats["decode_passes"] <= static.last_stats["decode_passes"]


def test_stop_tokens_end_rows_and_free_their_slots(gen_model, gen_tok, gen_images, slow_greedy):
    prompts, rows = _inputs(gen_tok, gen_images)
    # a token some rows make early and others never: those rows stop there
    candidates = [t for r in slow_greedy for t in r[1:4] if sum(t in o for o in slow_greedy) < len(slow_greedy)]
    assert candidates
    extra = candidates[0]
    expect = _cut(slow_greedy, {extra})
    assert expect != slow_greedy
    batcher = ContinuousBatcher(gen_model, [extra], slots=2, cache_len=160)
    reqs = [batcher.submit(p, im, m) for p, im, m in zip(prompts, rows, BUDGETS)]
    with torch.inference_mode():
        batcher.run_until_done()
    assert [r.tokens for r in reqs] == expect
    assert all(r.done for r in reqs)
    assert not gen_model.caches_are_setup()  # the model is left without caches between steps


def test_sampled_rows_depend_on_their_key_only(gen_model, gen_tok, gen_images):
    prompts, rows = _inputs(gen_tok, gen_images)
    budgets = [min(b, 6) for b in BUDGETS]
    kw = dict(temperature=0.9, top_k=40, seed=7)
    a = GenerationEngine(gen_model, gen_tok, batch_size=2, **kw).generate_tokens(prompts, rows, budgets, KEYS)
    # other slot counts, another order: each row in another slot beside other neighbours
    b = GenerationEngine(gen_model, gen_tok, batch_size=5, **kw).generate_tokens(
        prompts[::-1], rows[::-1], budgets[::-1], KEYS[::-1])
    assert b[::-1] == a
    static = GenerationEngine(gen_model, gen_tok, batch_size=4, continuous=False, **kw)
    assert static.generate_tokens(prompts, rows, budgets, KEYS) == a
    slow = [
        generate_reference(gen_model, gen_tok, p, im, max_new_tokens=m, temperature=0.9, top_k=40,
                           generator=make_generators([row_seed(7, k)])[0])
        for p, im, m, k in zip(prompts, rows, budgets, KEYS)
    ]
    assert a == slow
    greedy = GenerationEngine(gen_model, gen_tok, batch_size=2).generate_tokens(prompts, rows, budgets, KEYS)
    assert greedy != a


def test_requests_submitted_while_others_decode(gen_model, gen_tok, gen_images, slow_greedy):
    prompts, rows = _inputs(gen_tok, gen_images)
    engine = GenerationEngine(gen_model, gen_tok, batch_size=2)
    batcher = engine.open(cache_len=160)
    first = [engine.submit(batcher, prompts[i], rows[i], BUDGETS[i], KEYS[i]) for i in (1, 3)]
    for _ in range(4):
        batcher.step()
    assert first[0].tokens and not first[0].done  # decoding is under way
    late = [engine.submit(batcher, prompts[i], rows[i], BUDGETS[i], KEYS[i]) for i in (0, 5, 6)]
    batcher.run_until_done()
    expect = _cut(slow_greedy, set(gen_tok.stop_tokens))
    assert [r.tokens for r in first + late] == [expect[i] for i in (1, 3, 0, 5, 6)]
    assert not batcher.busy()


def test_zero_budgets_and_limits(gen_model, gen_tok, gen_images, slow_greedy):
    prompts, rows = _inputs(gen_tok, gen_images)
    engine = GenerationEngine(gen_model, gen_tok, batch_size=2)
    budgets = [0, 3, 0, 2, 1, 0, 4]
    expect = _cut([r[:m] for r, m in zip(slow_greedy, budgets)], set(gen_tok.stop_tokens))
    assert engine.generate_tokens(prompts, rows, budgets, KEYS) == expect
    assert engine.generate_tokens([], [], 3, []) == []
    batcher = ContinuousBatcher(gen_model, gen_tok.stop_tokens, slots=2, cache_len=len(prompts[0]) + 2)
    with pytest.raises(ValueError, match="cache_len"):
        batcher.submit(prompts[0], rows[0], 3)
    with pytest.raises(ValueError, match="generator"):
        ContinuousBatcher(gen_model, gen_tok.stop_tokens, slots=2, cache_len=64, temperature=0.5).submit(
            prompts[0], rows[0], 2)


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo's capture of the whole step (fullgraph), no code generation: fast
    pytest.param(True, marks=pytest.mark.slow),  # inductor: about a minute of compiling on a CPU
])
def test_compiled_decode_step_gives_the_same_tokens(gen_model, gen_tok, gen_images, slow_greedy, backend):
    prompts, rows = _inputs(gen_tok, gen_images)
    engine = GenerationEngine(gen_model, gen_tok, batch_size=3, compile=backend)
    expect = _cut(slow_greedy, set(gen_tok.stop_tokens))
    assert engine.generate_tokens(prompts, rows, BUDGETS, KEYS) == expect
    compiled = engine._batcher._decode
    # a second call of other lengths reuses the compiled step (cache length rounded up)
    assert engine.generate_tokens(prompts[1:5], rows[1:5], 2, KEYS[1:5]) == [e[:2] for e in expect[1:5]]
    assert engine._batcher._decode is compiled
