"""GenerationEngine: batching and the slow path give the same texts; sampled rows
depend on their key, not on their batch."""

from __future__ import annotations

from medcap.generation import GenerationEngine


def test_engine_batched_equals_slow_path_and_rows_are_keyed(gen_model, gen_tok, gen_images):
    qs = ["What is it?", "Where?", "Describe the finding in detail."]
    imgs = [gen_images[0], None, gen_images[1]]
    keys = ["a", "b", "c"]
    for temperature, top_k in ((0.0, None), (0.8, 30)):
        fast = GenerationEngine(gen_model, gen_tok, batch_size=3, temperature=temperature, top_k=top_k, seed=5)
        slow = GenerationEngine(gen_model, gen_tok, batch_size=1, temperature=temperature, top_k=top_k, seed=5, use_cache=False)
        prompts = [fast.prompt(q, has_image=im is not None) for q, im in zip(qs, imgs)]
        a = fast.generate_tokens(prompts, imgs, 5, keys)
        assert a == slow.generate_tokens(prompts, imgs, 5, keys)
        # Same key, another batch (alone, reordered): the same tokens.
        assert fast.generate_tokens(prompts[2:], imgs[2:], 5, keys[2:]) == a[2:]
        assert fast.generate_tokens(prompts[::-1], imgs[::-1], 5, keys[::-1]) == a[::-1]
        texts = fast.generate_texts(prompts, imgs, 5, keys)
        assert all(isinstance(t, str) and t == t.strip() for t in texts)
    sampled = GenerationEngine(gen_model, gen_tok, temperature=0.8, top_k=30, seed=5)
    p = [sampled.prompt("Q?")] * 2
    x, y = sampled.generate_tokens(p, [gen_images[0]] * 2, 8, ["k1", "k2"])
    assert x != y  # different keys draw different samples for the same prompt
