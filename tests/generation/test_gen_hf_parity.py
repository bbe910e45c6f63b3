"""Our decode path (own attention over the slot cache, grouped KV heads never expanded,
the vocabulary weight laid out for the CPU) gives Hugging Face ``generate``'s greedy tokens,
token for token: the tiny LLM (4 query heads on 2 KV heads) loaded by transformers from its
own folder, fed our fused embeddings (text + image soft tokens), one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from medcap.generation import ContinuousBatcher, GenerationEngine, build_prompt

QUESTIONS = ["What is it?", "Describe the lesion in the upper lobe of the right lung, please, in detail.", "Hi",
             "Is there a fracture of the left femur?", "Size?"]
HAS_IMAGE = [True, False, True, True, True]
BUDGETS = [9, 4, 13, 6, 11]


@pytest.fixture(scope="module")
def hf_tokens(tiny_llm, gen_model, gen_tok, gen_images):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llm["checkpoint_dir"], dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # grouped KV heads are what is tested
    out = []
    with torch.inference_mode():
        for i, (q, has, m) in enumerate(zip(QUESTIONS, HAS_IMAGE, BUDGETS)):
            tokens = torch.tensor([build_prompt(gen_tok, q, num_image_tokens=4, has_image=has)])
            embeds = gen_model.embed(tokens, gen_images[i:i + 1] if has else None)  # [1, s, d]
            gen = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(tokens), max_new_tokens=m,
                              min_new_tokens=m, do_sample=False, num_beams=1, eos_token_id=None,
                              pad_token_id=gen_tok.pad_id)
            out.append(gen[0, -m:].tolist())
    return out


def _inputs(tok, images):
    prompts = [build_prompt(tok, q, num_image_tokens=4, has_image=h) for q, h in zip(QUESTIONS, HAS_IMAGE)]
    return prompts, [images[i] if h else None for i, h in enumerate(HAS_IMAGE)]


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_continuous_batches_give_hf_generate_tokens(gen_model, gen_tok, gen_images, hf_tokens, slots):
    prompts, rows = _inputs(gen_tok, gen_images)
    batcher = ContinuousBatcher(gen_model, [], slots=slots, cache_len=160)
    reqs = [batcher.submit(p, im, m) for p, im, m in zip(prompts, rows, BUDGETS)]
    batcher.run_until_done()
    assert [r.tokens for r in reqs] == hf_tokens
    # the vocabulary weight was laid out for the CPU (same values, transposed strides)
    assert gen_model.decoder.output.weight.stride() == (1, gen_model.decoder.output.weight.shape[0])


def test_static_batches_give_hf_generate_tokens(gen_model, gen_tok, gen_images, hf_tokens):
    prompts, rows = _inputs(gen_tok, gen_images)
    static = ContinuousBatcher(gen_model, [], slots=3, cache_len=160, refill=False)
    reqs = [static.submit(p, im, m) for p, im, m in zip(prompts, rows, BUDGETS)]
    static.run_until_done()
    assert [r.tokens for r in reqs] == hf_tokens
    # static: the second batch (2 rows) starts once the first (3 rows, longest 13) is done
    assert static.stats["prefill_passes"] == 2
    assert static.stats["decode_passes"] == (13 - 1) + (11 - 1)


def test_engine_static_and_continuous_runs_give_hf_generate_tokens(gen_model, gen_tok, gen_images, hf_tokens):
    prompts, rows = _inputs(gen_tok, gen_images)
    keys = [f"k{i}" for i in range(len(prompts))]
    for continuous in (True, False):
        engine = GenerationEngine(gen_model, gen_tok, batch_size=2, continuous=continuous)
        # the tokenizer's stop tokens may end rows early: compare up to each row's stop
        got = engine.generate_tokens(prompts, rows, BUDGETS, keys)
        stop = set(gen_tok.stop_tokens)
        expect = [next((h[:i] for i, t in enumerate(h) if t in stop), h) for h in hf_tokens]
        assert got == expect
