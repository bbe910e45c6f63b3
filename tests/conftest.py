"""Session-wide fixtures any test area may use: a tiny HF-format Llama with its
tokenizer, a builder of tiny fused models loaded from it, and ``one_thread``."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """``medcap.testing.make_tiny_llm`` written once per session (read-only: do not modify).

    Keys: tokenizer_path, special_tokens_path, checkpoint_dir, checkpoint_files,
    image_token_id, model_kwargs.
    """
    from medcap.testing import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_llm):
    """Builder: ``tiny_model(num_image_tokens=4, load_weights=True, seed=0, **sizes)`` -> a
    fresh ``MedcapModel`` whose decoder holds ``tiny_llm``'s weights (vision seeded by ``seed``).

    ``sizes`` may change the vision and projector sizes freely; decoder sizes other
    than ``tiny_llm``'s need ``load_weights=False``.
    """
    import torch

    from medcap.checkpointing import load_llama_weights
    from medcap.models import medcap_tiny

    decoder_state = {}  # loaded once: torchtune's checkpointer costs ~1 s (a gc.collect per shard)

    def build(num_image_tokens: int = 4, load_weights: bool = True, seed: int = 0, **sizes):
        torch.manual_seed(seed)
        model = medcap_tiny(**{**tiny_llm["model_kwargs"], **sizes}, num_image_tokens=num_image_tokens)
        if load_weights:
            if not decoder_state:
                load_llama_weights(model, tiny_llm["checkpoint_dir"], tiny_llm["checkpoint_files"])
                decoder_state.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")})
            else:
                missing, unexpected = model.load_state_dict(decoder_state, strict=False)
                assert not unexpected and all(k.startswith("encoders.") for k in missing)
        return model

    return build


@pytest.fixture
def one_thread():
    """Toy-sized ops run far faster on one thread than on cores shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
