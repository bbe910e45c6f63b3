"""Names of files and keys that a writer and a reader in different layers share.

* ``HEADER_KEY``: the safetensors header entry holding medcap's metadata JSON (the vision
  checkpoint writes it, ``medcap.config`` reads it without torch);
* ``EXPORT_*``: the files of a folder ``medcap export`` writes that medcap itself reads
  back (the model folder as a checkpoint: its config.json, its vision weights, its
  tokenizer files where a Llama folder keeps them).
"""

HEADER_KEY = "medcap"
EXPORT_CONFIG = "config.json"
EXPORT_VISION = "vision.safetensors"
EXPORT_TOKENIZER = "original/tokenizer.model"
EXPORT_SPECIAL_TOKENS = "original/special_tokens.json"
