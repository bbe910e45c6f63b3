"""Option log-likelihoods against a plain per-sequence forward pass."""

from __future__ import annotations

import pytest
import torch

from medcap.generation import GenerationEngine, build_prompt
from medcap.generation._score import option_tokens, score_options


def _manual(model, tok, prompt, image, option):
    cont = tok.encode(option.strip(), add_bos=False, add_eos=False) + [tok.eot_id]
    seq = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq, images=None if image is None else image[None])[0], dim=-1)  # [s, V]
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont)), len(cont)


def test_score_options_equals_per_sequence_forward(gen_model, gen_tok, gen_images):
    prompts = [
        build_prompt(gen_tok, "Which modality?", num_image_tokens=4),
        build_prompt(gen_tok, "Pick one", num_image_tokens=4, has_image=False),
        build_prompt(gen_tok, "Is the lesion on the left or on the right side?", num_image_tokens=4),
    ]
    images = [gen_images[0], None, gen_images[1]]
    options = [["CT", "X-Ray", "Magnetic resonance imaging"], ["yes", "no"], ["left", "right", "both", "neither"]]
    got = score_options(gen_model, gen_tok, prompts, torch.stack([gen_images[0], gen_images[1]]), options)
    got_mean = score_options(gen_model, gen_tok, prompts, torch.stack([gen_images[0], gen_images[1]]), options, reduction="mean")
    for i, (p, im, opts) in enumerate(zip(prompts, images, options)):
        assert len(got[i]) == len(opts)
        for k, o in enumerate(opts):
            total, n = _manual(gen_model, gen_tok, p, im, o)
            assert got[i][k] == pytest.approx(total, abs=1e-3)
            assert got_mean[i][k] == pytest.approx(total / n, abs=1e-3)
    # The options are told apart, and the image matters.
    assert len(set(got[0])) == 3
    other = score_options(gen_model, gen_tok, prompts[:1], gen_images[4:5], options[:1])
    assert max(abs(a - b) for a, b in zip(other[0], got[0])) > 1e-4
    # The engine batches the same computation.
    engine = GenerationEngine(gen_model, gen_tok, batch_size=2)
    batched = engine.score_options(prompts, images, options)
    assert [len(b) for b in batched] == [len(g) for g in got]
    for b, g in zip(batched, got):
        assert b == pytest.approx(g, abs=1e-4)
    assert option_tokens(gen_tok, " CT ")[-1] == gen_tok.eot_id


def test_score_options_rejects_bad_inputs(gen_model, gen_tok, gen_images):
    p = [build_prompt(gen_tok, "Q", num_image_tokens=4)]
    with pytest.raises(ValueError, match="image"):
        score_options(gen_model, gen_tok, p, None, [["a"]])
    with pytest.raises(ValueError, match="reduction"):
        score_options(gen_model, gen_tok, p, gen_images[:1], [["a"]], reduction="max")
