"""The 8B path on locally made files of the real formats: Llama-3.1-8B's config.json and Meta's
tokenizer (rebuilt byte for byte), BiomedCLIP's ViT-B/16 tower; the model is built on the meta
device (no 16 GB of weights), the folder exported, and reloaded by transformers on the meta device
and by medcap: every tensor's shape, the parameter count and the prompt ids agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hf_child import QUESTIONS, run_child

LLAMA_8B_PARAMETERS = 8_030_261_248  # Llama-3.1-8B: embeddings, 32 layers, norm, untied lm_head


@pytest.fixture(scope="module")
def folder_8b(llama3_tokenizer_path, tmp_path_factory):
    import torch

    from medcap.models import hf_llama3_1_config, medcap_llama3_1_8b, save_vision_checkpoint
    from medcap.training import describe_model

    root = tmp_path_factory.mktemp("llama8b")
    llm = root / "Meta-Llama-3.1-8B-Instruct"
    (llm / "original").mkdir(parents=True)
    hf = hf_llama3_1_config(128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                            intermediate_dim=14336, max_seq_len=131072)
    hf.bos_token_id, hf.eos_token_id = 128000, [128001, 128008, 128009]
    hf.save_pretrained(llm)  # config.json only: an export that points at the LLM reads no LLM weight
    (llm / "original" / "tokenizer.model").write_bytes(Path(llama3_tokenizer_path).read_bytes())
    # projector_hidden_dim 8 instead of 4096 keeps the vision file small (87 M values, not 930 M)
    model_cfg = {"_component_": "medcap.models.medcap_llama3_1_8b", "num_image_tokens": 50, "projector_hidden_dim": 8}
    with torch.device("meta"):
        model = medcap_llama3_1_8b(num_image_tokens=50, projector_hidden_dim=8)
    vision = model.vision.to_empty(device="cpu")
    state = {part: {k: v.zero_().to(torch.bfloat16) for k, v in getattr(vision, part).state_dict().items()}
             for part in ("visual", "projector")}
    desc = describe_model(model, model_cfg=model_cfg, checkpointer={"checkpoint_dir": str(llm)},
                          tokenizer={"_component_": "medcap.models.llama3_tokenizer",
                                     "path": str(llm / "original" / "tokenizer.model")}, dtype="bf16")
    ckpt = root / "run" / "meta_model_last.safetensors"
    ckpt.parent.mkdir()
    save_vision_checkpoint(state, ckpt, metadata={**desc, "num_image_tokens": 50, "embed_dim": 4096})
    from medcap.export import export_model

    return {"folder": export_model(str(ckpt), str(root / "export")), "llm": llm, "ckpt": ckpt}


@pytest.mark.slow
@pytest.mark.integration
def test_an_8b_shaped_model_exports_and_reloads_on_the_meta_device(folder_8b, llama3_tokenizer, tmp_path):
    from medcap.generation import build_prompt
    from medcap.models._vision_checkpoint import load_vision_checkpoint

    folder = str(folder_8b["folder"])
    config = json.loads((folder_8b["folder"] / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (4096, 32, 8)
    assert (config["image_token_id"], config["num_image_tokens"], config["dtype"]) == (128256, 50, "bfloat16")
    assert config["vision_tower"] == {"timm_model": "vit_base_patch16_224", "timm_kwargs": {}, "output_dim": 512}
    res = run_child({"meta": [folder], "questions": QUESTIONS}, str(tmp_path / "child"))
    assert res["proof"]["find_spec_is_none"] and res["proof"]["loaded"] == []
    built = res["meta"][folder]
    assert built["class"] == "MedcapForCausalLM"
    shapes = built["shapes"]
    llm = {k: v for k, v in shapes.items() if not k.startswith(("visual.", "projector."))}
    count = sum(math.prod(v) for v in llm.values())
    assert count == LLAMA_8B_PARAMETERS
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == [1024, 4096] and shapes["lm_head.weight"] == [128256, 4096]
    # the vision side medcap exported has exactly the places the transformers model has for it
    state, meta = load_vision_checkpoint(folder)
    ours = {f"{part}.{k}": list(v.shape) for part, sd in state.items() for k, v in sd.items()}
    assert ours == {k: v for k, v in shapes.items() if k.startswith(("visual.", "projector."))}
    assert ours["projector.2.weight"] == [4096 * 50, 8] and len([k for k in ours if k.endswith("qkv.weight")]) == 12
    # the real Llama 3 tokenizer: the folder's prompt ids are medcap's (image 128256 x 50)
    expected = [build_prompt(llama3_tokenizer, q, num_image_tokens=50) for q in QUESTIONS]
    assert built["prompts"] == expected and expected[0][:5] == [128000, 128006, 882, 128007, 271]
    assert expected[0].count(128256) == 50


@pytest.mark.slow
def test_medcap_reads_the_8b_folder_back_on_the_meta_device(folder_8b):
    import torch

    from medcap.config import GenerateConfig, from_config
    from medcap.models._load import build_model

    conf = from_config(GenerateConfig, {"vision_checkpoint": str(folder_8b["folder"]), "image": str(folder_8b["ckpt"])})
    assert conf.model == {"_component_": "medcap.models.medcap_llama3_1_8b", "num_image_tokens": 50,
                          "projector_hidden_dim": 8}
    assert conf.dtype == "bf16" and conf.checkpointer.checkpoint_dir == str(folder_8b["llm"].resolve())
    assert conf.tokenizer["path"] == str(folder_8b["folder"] / "original" / "tokenizer.model")
    model = build_model(conf.model, device=torch.device("meta"), dtype=torch.bfloat16, skip_pretrained=True)
    assert sum(p.numel() for p in model.decoder.parameters()) + model.tok_embeddings.weight.numel() == 8_030_261_248


TEXTS = ["Hello world", "Ärztliche Befunde: 12345 mm³, 0.5 cm — ✓ 肺结节 (right upper lobe)",
         "  leading and   inner   spaces\n\n\nnewlines\t\ttabs \r\n", "it's can't I'LL we'VE", "😀🩻 x-ray\u00a0nbsp",
         "<|eot_id|> written as text", "1234567890 3.14159 -42", "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, Ελληνικά, русский"]


@pytest.mark.slow
def test_the_8b_folders_tokenizer_json_gives_the_real_llama3_tokenizers_ids(folder_8b, llama3_tokenizer):
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(folder_8b["folder"] / "tokenizer.json"))
    for text in TEXTS:
        ours = llama3_tokenizer.encode(text, add_bos=False, add_eos=False)
        if "<|eot_id|>" in text:  # medcap encodes special-token text as plain text; the hub tokenizer splits it
            assert fast.encode(text, add_special_tokens=False).ids[0] == 128009
            continue
        assert fast.encode(text, add_special_tokens=False).ids == ours, text
        assert fast.decode(ours, skip_special_tokens=False) == llama3_tokenizer.decode(ours)
    for name, token_id in llama3_tokenizer.special_tokens.items():
        assert fast.token_to_id(name) == token_id, name
