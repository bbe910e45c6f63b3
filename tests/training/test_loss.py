"""The label-only loss against an independent full-logits cross-entropy, and TrainForward
(forward + loss in one module) on a rank whose batch holds no image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcap.training import LabelTokenCrossEntropy, TrainForward, count_label_tokens


def _batch(model, seed=0, b=3, s=14):
    """Tokens with one image run per row and labels on a random subset after it."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.decoder.output.out_features
    tokens = torch.randint(0, vocab - 20, (b, s), generator=g)
    t = model.num_image_tokens
    tokens[:, 1 : 1 + t] = model.image_token_id
    labels = torch.full((b, s), -100)
    keep = torch.rand(b, s, generator=g) < 0.6
    keep[:, : 1 + t + 1] = False
    labels[keep] = tokens[keep]
    labels[1, 8:] = -100  # a row with few labels
    images = torch.randn(b, 3, 32, 32, generator=g)
    return tokens, labels, images


def _reference(model, tokens, labels, images):
    """Plain next-token CE over the full logits, as the reference computed it."""
    logits = model(tokens, images=images)  # [b, s, V]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_loss_and_grads_match_full_logits(tiny_model, chunk_size):
    model = tiny_model()
    model.requires_grad_(False)
    model.vision.requires_grad_(True)
    tokens, labels, images = _batch(model)

    ref = _reference(model, tokens, labels, images)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.vision.named_parameters()}
    model.zero_grad(set_to_none=True)

    out = LabelTokenCrossEntropy(chunk_size=chunk_size)(model, model.hidden_states(tokens, images=images), labels)
    assert out.count == int((labels[:, 1:] != -100).sum()) == count_label_tokens(labels)
    torch.testing.assert_close(out.mean, ref, rtol=1e-5, atol=1e-6)
    out.mean.backward()
    for n, p in model.vision.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_per_sample_losses(tiny_model):
    model = tiny_model()
    tokens, labels, images = _batch(model, seed=3)
    with torch.no_grad():
        out = LabelTokenCrossEntropy(chunk_size=4)(
            model, model.hidden_states(tokens, images=images), labels, per_sample=True
        )
        logits = model(tokens, images=images)
    for r in range(tokens.shape[0]):
        ref = F.cross_entropy(logits[r, :-1], labels[r, 1:], ignore_index=-100)
        torch.testing.assert_close(out.per_sample_mean[r], ref, rtol=1e-5, atol=1e-6)
    assert out.per_sample_count.tolist() == (labels[:, 1:] != -100).sum(1).tolist()


def test_no_labels_gives_zero_with_graph(tiny_model):
    model = tiny_model()
    model.requires_grad_(False)
    model.vision.requires_grad_(True)
    tokens, labels, images = _batch(model)
    labels[:] = -100
    out = LabelTokenCrossEntropy()(model, model.hidden_states(tokens, images=images), labels)
    assert out.count == 0 and float(out.total.detach()) == 0.0
    assert out.total.requires_grad  # every rank must be able to run backward
    out.total.backward()
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.vision.parameters())


def test_the_vocabulary_is_projected_only_at_label_positions(tiny_model):
    """Count the rows that reach the output projection: the label tokens, not b * s."""
    model = tiny_model()
    tokens, labels, images = _batch(model)
    rows = []
    handle = model.decoder.output.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    with torch.no_grad():
        LabelTokenCrossEntropy(chunk_size=7)(model, model.hidden_states(tokens, images=images), labels)
    handle.remove()
    n = count_label_tokens(labels)
    assert sum(rows) == n < tokens.numel()
    assert max(rows) <= 7


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        LabelTokenCrossEntropy(chunk_size=0)


def _text_only_batch(model, b=2, s=10):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (b, s), generator=g)
    labels = tokens.clone()
    labels[:, :4] = -100
    return tokens, labels


def test_keep_graph_lets_every_rank_run_backward_without_images(tiny_model):
    """A rank whose batch has no image must still run backward through the (sharded)
    decoder layers, or the other ranks would wait for its all-gathers forever."""
    model = tiny_model()
    model.requires_grad_(False)
    model.vision.requires_grad_(True)
    tokens, labels = _text_only_batch(model)
    plain_total, _ = TrainForward(model, LabelTokenCrossEntropy())(tokens, labels)
    assert not plain_total.requires_grad  # single device: nothing to learn, backward skipped
    seen = []
    hooks = [layer.register_full_backward_hook(lambda m, gi, go: seen.append(m)) for layer in model.decoder.layers]
    total, count = TrainForward(model, LabelTokenCrossEntropy(), keep_graph=True)(tokens, labels)
    assert total.requires_grad and int(count) == int((labels[:, 1:] != -100).sum())
    total.backward()
    for h in hooks:
        h.remove()
    assert len(seen) == len(model.decoder.layers)  # backward went through every layer
    torch.testing.assert_close(total.detach(), plain_total)
