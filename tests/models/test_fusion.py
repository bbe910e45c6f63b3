"""The fused model: forward, where image vectors land, the placeholder checks, freezing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from medcap.models import ImageTokenMismatchError, assert_only_vision_trainable

T = 4  # image tokens per image in these tests
S = 14  # sequence length


def _batch(image_token_id: int, starts, seq_len: int = S, seed: int = 0) -> torch.Tensor:
    """Rows of random text ids with one run of T placeholders at ``starts[row]`` (None: no image)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (len(starts), seq_len), generator=g)
    for row, start in enumerate(starts):
        if start is not None:
            tokens[row, start : start + T] = image_token_id
    return tokens


def _images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_gives_float32_logits_and_matches_hidden_state_route(tiny_model, tiny_llm):
    model = tiny_model(num_image_tokens=T).eval()
    tokens = _batch(model.image_token_id, [2, None, 7])
    images = _images(2)
    with torch.no_grad():
        logits = model(tokens, images=images)
        via_hidden = model.logits(model.hidden_states(tokens, images=images))
        via_encoder_input = model(tokens, encoder_input={"image": {"images": images}})
    assert logits.shape == (3, S, tiny_llm["model_kwargs"]["vocab_size"])
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(via_hidden, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_encoder_input, logits, rtol=0, atol=0)
    # The image must matter: a different image changes the logits of its own row only.
    with torch.no_grad():
        other = model(tokens, images=torch.cat([images[:1], _images(1, seed=9)]))
    assert torch.equal(other[:2], logits[:2])
    assert not torch.allclose(other[2, 7:], logits[2, 7:])


class _IdentityLayer(nn.Module):
    """Stands in for a decoder layer: passes the hidden states through, has no cache."""

    def forward(self, h, **kwargs):
        return h

    def caches_are_enabled(self) -> bool:
        return False

    def caches_are_setup(self) -> bool:
        return False


def test_image_vectors_land_at_the_placeholders_in_batch_order(tiny_model, tiny_llm):
    """With the decoder reduced to identities the output *is* the fused input embedding."""
    model = tiny_model(num_image_tokens=T).eval()
    model.decoder.layers = nn.ModuleList([_IdentityLayer()])
    model.decoder.norm = nn.Identity()
    model.decoder.output = nn.Identity()
    starts = [2, None, 7]
    tokens = _batch(model.image_token_id, starts)
    images = _images(2)
    with torch.no_grad():
        fused = model(tokens, images=images)  # [b, s, d]
        expected_img = model.vision(images)  # [n, T, d], computed on its own
    # Text rows come from the HF checkpoint's embedding table, read independently of torchtune.
    hf = load_file(f"{tiny_llm['checkpoint_dir']}/{tiny_llm['checkpoint_files'][0]}")
    table = hf["model.embed_tokens.weight"]
    image_index = 0
    for row, start in enumerate(starts):
        for pos in range(S):
            if start is not None and start <= pos < start + T:
                torch.testing.assert_close(fused[row, pos], expected_img[image_index, pos - start], rtol=0, atol=0)
            else:
                torch.testing.assert_close(fused[row, pos], table[tokens[row, pos]], rtol=0, atol=0)
        image_index += start is not None
    # The route that skips the vocabulary projection splices the same way.
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(tokens, images=images), fused, rtol=0, atol=0)
        torch.testing.assert_close(model.embed(tokens, images), fused, rtol=0, atol=0)


def _mismatch_cases(I):
    text = list(range(10, 10 + S))

    def row(*runs):
        """Build a row: ints are text tokens, ('img', k) a run of k placeholders."""
        out = []
        for r in runs:
            out.extend([I] * r[1] if isinstance(r, tuple) else [r])
        return (out + text)[:S]

    return {
        "too few placeholders": ([row(1, ("img", T - 1))], 1),
        "too many placeholders": ([row(1, ("img", T + 1))], 1),
        "partial runs adding up": ([row(1, ("img", T + T // 2)), row(1, ("img", T // 2))], 2),
        "run split by text": ([row(1, ("img", T // 2), 5, ("img", T // 2))], 1),
        "images without placeholders": ([row(1, 2, 3)], 1),
        "placeholders without images": ([row(1, ("img", T))], 0),
        "more runs than images": ([row(1, ("img", T)), row(2, ("img", T))], 1),
    }


@pytest.mark.parametrize(
    "case",
    [
        "too few placeholders",
        "too many placeholders",
        "partial runs adding up",
        "run split by text",
        "images without placeholders",
        "placeholders without images",
        "more runs than images",
    ],
)
def test_placeholder_image_mismatch_is_an_error(tiny_model, case):
    model = tiny_model(num_image_tokens=T, load_weights=False).eval()
    rows, n_images = _mismatch_cases(model.image_token_id)[case]
    tokens = torch.tensor(rows)
    images = _images(n_images) if n_images else None
    with pytest.raises(ImageTokenMismatchError, match="placeholder"):
        model(tokens, images=images)


def test_matching_placeholders_pass_the_check(tiny_model):
    """The control for the mismatch cases: whole runs, adjacent images in one row included."""
    model = tiny_model(num_image_tokens=T, load_weights=False).eval()
    I = model.image_token_id
    tokens = torch.tensor([[1] + [I] * (2 * T) + [2] * (S - 1 - 2 * T), [3] * S, [4, 5] + [I] * T + [6] * (S - 2 - T)])
    with torch.no_grad():
        out = model(tokens, images=_images(3))
    assert out.shape[:2] == (3, S)


def test_llm_is_frozen_and_vision_trains(tiny_model):
    model = tiny_model(num_image_tokens=T)
    assert_only_vision_trainable(model)
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == {n for n in names if n.startswith("encoders.image.")}
    assert any(n.startswith("encoders.image.visual.") for n in trainable)
    assert any(n.startswith("encoders.image.projector.") for n in trainable)
    assert not model.tok_embeddings.weight.requires_grad

    tokens = _batch(model.image_token_id, [3, 5])
    model(tokens, images=_images(2)).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in names.items() if not n.startswith("encoders.image."))
    assert all(p.grad is not None for n, p in names.items() if n.startswith("encoders.image."))

    model.decoder.layers[0].mlp.w1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        assert_only_vision_trainable(model)
