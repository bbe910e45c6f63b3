"""A medcap model for transformers: the frozen Llama (transformers' ``LlamaForCausalLM``),
an image tower (a timm ViT with a linear head) and the projector, whose soft tokens take the
places of the image placeholders in the prompt.

Copied by ``medcap export`` into the model folder and loaded as remote code:

    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    out = model.generate(**processor(images=image, text="Is there a fracture?", return_tensors="pt"))

In order: the vision side (``MedcapImageTower``, the projector); the model
(``MedcapForCausalLM``: ``image_features``, ``embed``, ``forward``); loading
(``from_pretrained``: the LLM from the folder or from ``config.base_llm``, then the tower
and the projector from ``vision.safetensors``; a missing file is named in one line).
Imports torch, transformers, safetensors and timm; never medcap.
"""

import json
import os
from collections import OrderedDict

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM

from .configuration_medcap import MedcapConfig

VISION_WEIGHTS = "vision.safetensors"  # config.json's vision_weights names it
WEIGHTS_INDEX = "model.safetensors.index.json"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


# ---- The vision side


class MedcapImageTower(nn.Module):
    """A timm ViT trunk (class-token output) and a linear head, laid out as open_clip's
    ``TimmModel`` (keys ``trunk.*``, ``head.proj.weight``), so medcap's weights load unchanged."""

    def __init__(self, spec):
        super().__init__()
        import timm

        kwargs = spec.get("timm_kwargs") or {}
        self.trunk = timm.create_model(spec["timm_model"], pretrained=False, num_classes=0, **kwargs)
        proj = nn.Linear(self.trunk.num_features, int(spec["output_dim"]), bias=False)
        self.head = nn.Sequential(OrderedDict(drop=nn.Dropout(0.0), proj=proj))

    def forward(self, images):
        return self.head(self.trunk(images))  # [n, 3, S, S] -> [n, output_dim]


def _projector(in_dim, hidden_dim, embed_dim, num_image_tokens):
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim * num_image_tokens))


# ---- The model


class MedcapForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose prompt may hold image placeholders: with ``pixel_values``,
    each image's ``num_image_tokens`` soft tokens replace one run of placeholders (in batch
    order). The LLM's weights keep Llama's names (``model.*``, ``lm_head.*``); the vision
    side's are ``visual.*`` and ``projector.*``, as in medcap's checkpoints."""

    config_class = MedcapConfig
    # Loaded from the base LLM's folder, the model lacks these until vision.safetensors is read.
    _keys_to_ignore_on_load_missing = [r"^visual\.", r"^projector\."]

    def __init__(self, config):
        super().__init__(config)
        self.visual = MedcapImageTower(config.vision_tower)
        self.projector = _projector(
            int(config.vision_tower["output_dim"]), int(config.projector_hidden_dim),
            int(config.hidden_size), int(config.num_image_tokens),
        )
        self.post_init()

    def image_features(self, pixel_values):
        """Images ``[n, 3, S, S]`` -> soft tokens ``[n, num_image_tokens, hidden_size]``."""
        dtype = self.projector[0].weight.dtype
        feats = self.projector(self.visual(pixel_values.to(dtype)))  # [n, T * d]
        return feats.view(pixel_values.shape[0], int(self.config.num_image_tokens), int(self.config.hidden_size))

    def embed(self, input_ids, pixel_values):
        """Token embeddings with each image's soft tokens at its placeholders: [b, s] -> [b, s, d]."""
        is_image = input_ids == self.config.image_token_id  # [b, s]
        t = int(self.config.num_image_tokens)
        n = 0 if pixel_values is None else int(pixel_values.shape[0])
        per_row = is_image.sum(dim=1)
        if int(per_row.sum()) != n * t or bool((per_row % t).any()):
            raise ValueError(
                f"the prompt holds {int(per_row.sum())} image placeholders (per row: {per_row.tolist()}) but "
                f"{n} image(s) x {t} soft tokens were given: build inputs with the folder's processor"
            )
        # The placeholder id lies outside the vocabulary: look up a valid id there, then overwrite it.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [b, s, d]
        if n:
            feats = self.image_features(pixel_values).to(embeds.dtype)  # [n, T, d]
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        """``LlamaForCausalLM.forward``, with the image placeholders of ``input_ids`` filled
        from ``pixel_values`` (the prefill; decoding steps carry no placeholder)."""
        if input_ids is not None and inputs_embeds is None and bool((input_ids == self.config.image_token_id).any()):
            inputs_embeds, input_ids = self.embed(input_ids, pixel_values), None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    # ---- Loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """The LLM's weights from the folder (``llm_included``) or from ``config.base_llm``,
        then the image tower and the projector from ``vision.safetensors``."""
        source = str(pretrained_model_name_or_path)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}  # where this folder's own files come from
        config = kwargs.pop("config", None)
        if not isinstance(config, MedcapConfig):
            config = MedcapConfig.from_pretrained(source, **hub)
        vision_path = _folder_file(source, getattr(config, "vision_weights", None) or VISION_WEIGHTS, hub)
        if getattr(config, "llm_included", False):
            _check_index(source)
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(source, *model_args, config=config, output_loading_info=True,
                                                  **kwargs)
            if any(k.startswith(("visual.", "projector.")) for k in info.get("missing_keys", ())):
                model.load_vision(vision_path)  # never leave the vision side at its random start
            return (model, info) if want_info else model
        llm = getattr(config, "base_llm", None)
        if not llm:
            raise ValueError(f"{source}: config.json names no base_llm and the folder holds no LLM weights")
        if os.path.isabs(llm) and not os.path.isdir(llm):
            raise FileNotFoundError(
                f"the base LLM folder {llm} that {source}/config.json names is not there: set base_llm in "
                "config.json to its folder or hub name"
            )
        # the base LLM is another repository: this folder's revision and subfolder do not apply to it
        llm_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "subfolder")}
        model = super().from_pretrained(llm, *model_args, config=config, **llm_kwargs)
        model.load_vision(vision_path)
        # the base LLM's folder gave its own generation settings: the folder's stop tokens decide
        model.generation_config = GenerationConfig.from_pretrained(source, **hub)
        return model

    def load_vision(self, path):
        """The tower and the projector from a safetensors file (keys ``visual.*``, ``projector.*``)."""
        state = load_file(path)
        for name in ("visual", "projector"):
            module = getattr(self, name)
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            ref = next(module.parameters())
            module.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in part.items()}, strict=True)


def _folder_file(source, name, hub=None):
    """The path of ``name`` in a local folder or a hub repository; a missing one is named."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the model folder is incomplete (export it again)")
        return path
    from transformers.utils import cached_file

    return cached_file(source, name, **(hub or {}))


def _check_index(source):
    """Every file the weights index names is there (a local folder)."""
    if not os.path.isdir(source):
        return
    index = _folder_file(source, WEIGHTS_INDEX)
    with open(index, encoding="utf-8") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    for name in files:
        _folder_file(source, name)
