"""The configuration of a model ``medcap export`` wrote: a Llama configuration (the frozen
LLM, as its own ``config.json`` describes it) with the vision side's keys added.

Copied by ``medcap export`` into the model folder, where transformers loads it as remote
code (``trust_remote_code=True``); it imports transformers only, never medcap.

The keys beyond Llama's:

    vision_tower          {"timm_model", "timm_kwargs", "output_dim"}: the image tower (a timm ViT + a linear head)
    projector_hidden_dim  the projector's hidden width (Linear, GELU, Linear)
    num_image_tokens      soft tokens per image, each taking one placeholder's place in the prompt
    image_token_id        the placeholder's id (one past the LLM's vocabulary)
    image_size            the side of the square image the tower takes
    base_llm              where the LLM's weights are: a local folder or a hub name (when not in the folder)
    llm_included          True when the LLM's weight files are in the folder itself
    vision_weights        the file holding the tower and the projector (vision.safetensors)
    medcap                what medcap recorded about the model and its training (for people and for medcap)
"""

from transformers import LlamaConfig


class MedcapConfig(LlamaConfig):
    """``LlamaConfig`` plus the keys above, stored as given (``model_type`` ``medcap``)."""

    model_type = "medcap"
