"""The real-size builder, checked on the meta device (no memory, no weights)."""

from __future__ import annotations

import torch
from open_clip.timm_model import TimmModel

from medcap.models import medcap_llama3_1_8b
from medcap.models._model import LLAMA3_IMAGE_TOKEN_ID

# Published parameter count of Llama-3.1-8B (untied input and output embeddings).
LLAMA_3_1_8B_PARAMS = 8_030_261_248


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_8b_builder_sizes_on_meta_device():
    with torch.device("meta"):
        model = medcap_llama3_1_8b()
        # BiomedCLIP's tower exactly as open_clip builds it (design.md), as the reference for sizes.
        biomedclip = TimmModel(
            "vit_base_patch16_224", 512, image_size=224, pool="", proj="linear", proj_bias=False, pretrained=False
        )

    # EarlyFusionModel moved the token embedding out of the decoder.
    decoder = _count(model.decoder) + _count(model.tok_embeddings)
    assert decoder == LLAMA_3_1_8B_PARAMS
    assert model.tok_embeddings.num_embeddings == 128_256
    # The placeholder sits one past the vocabulary, as in the real tokenizer.
    assert model.image_token_id == LLAMA3_IMAGE_TOKEN_ID == 128_256

    # 512 -> 4096 -> 4096 x 50, ~840 M parameters.
    assert model.num_image_tokens == model.vision.num_image_tokens == 50
    assert _count(model.vision.projector) == (512 * 4096 + 4096) + (4096 * 4096 * 50 + 4096 * 50)
    assert 835e6 < _count(model.vision.projector) < 845e6

    # ~86 M, and key-for-key the tower open_clip builds, so BiomedCLIP's weights fit it.
    tower = _count(model.vision.visual)
    assert tower == _count(biomedclip)
    assert 85e6 < tower < 87e6
    ours = {k: tuple(v.shape) for k, v in model.vision.visual.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in biomedclip.state_dict().items()}
    assert ours == theirs
    assert model.vision.visual.image_size == 224
    assert model.vision.visual.output_dim == 512


def test_image_token_count_flows_to_the_projector():
    with torch.device("meta"):
        model = medcap_llama3_1_8b(num_image_tokens=8, projector_hidden_dim=256)
    assert model.num_image_tokens == 8
    assert model.vision.projector[0].out_features == 256
    assert model.vision.projector[2].out_features == 8 * 4096
