"""TrainConfig: the training recipe's typed config, its checks and the keys it converts
(the reference's legacy keys, torchtune's chat dataset and loss, resume_from_checkpoint)."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from medcap.config import ConfigError, TrainConfig, resolve_dataset_config, resolve_loss_config, resume_mode


def _cfg(**over):
    base = {
        "vision": "biomedclip",
        "model": {"_component_": "medcap.models.medcap_tiny"},
        "tokenizer": {"_component_": "x"},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": "/x"},
        "dataset": {"_component_": "medcap.data.chat_dataset"},
        "optimizer": {"_component_": "torch.optim.AdamW"},
        "batch_size": 2,
        "epochs": 1,
        "output_dir": "/tmp/o",
    }
    cfg = OmegaConf.create(base)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


@pytest.mark.parametrize(
    "over,distributed,match",
    [
        ({"vision": "clip"}, False, "biomedclip"),
        ({"optimizer_in_bwd": True, "gradient_accumulation_steps": 2}, False, "gradient_accumulation_steps=1"),
        ({"optimizer_in_bwd": True}, True, "single-device"),
        ({"optimizer_in_bwd": True, "clip_grad_norm": 1.0}, False, "clip_grad_norm"),
        ({"dtype": "fp16"}, False, "dtype"),
        ({"batch_size": 0}, False, "batch_size"),
        ({"checkpoint_format": "bin"}, False, "checkpoint_format"),
        ({"checkpointer._component_": "torchtune.training.FullModelMetaCheckpointer"}, False, "Hugging Face"),
    ],
)
def test_config_errors(over, distributed, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_config(_cfg(**over)).check_world(2 if distributed else 1)


def test_config_ok():
    TrainConfig.from_config(_cfg(optimizer_in_bwd=True)).check_world(1)
    TrainConfig.from_config(_cfg(gradient_accumulation_steps=4)).check_world(2)


def test_config_defaults_follow_the_reference():
    cfg = TrainConfig.from_config(_cfg(**{"checkpointer.output_dir": "/o/ckpt"}))
    assert cfg.save_last_every_seconds == 8 * 3600 and cfg.save_last_every_steps is None
    assert cfg.checkpoint_format == "safetensors" and cfg.checkpoint_suffix == ".safetensors"
    assert str(cfg.checkpoint_dir) == "/o/ckpt"
    assert str(TrainConfig.from_config(_cfg()).checkpoint_dir) == "/tmp/o"  # no checkpointer.output_dir


@pytest.mark.parametrize("key,closest", [("batch_sze", "batch_size"), ("checkpointer.outputdir", "output_dir")])
def test_an_unknown_key_names_the_closest_valid_one(key, closest):
    with pytest.raises(ConfigError, match=rf"unknown key .*{key.split('.')[-1]}.*did you mean '{closest}'"):
        TrainConfig.from_config(_cfg(**{key: 4}))


def test_the_references_legacy_keys_are_accepted(caplog):
    with caplog.at_level(logging.DEBUG, logger="medcap.config"):
        cfg = TrainConfig.from_config(_cfg(compile=False, log_peak_memory_stats=True, enable_activation_offloading=False))
    assert cfg.checkpointer.component == "torchtune.training.FullModelHFCheckpointer"
    assert "compile is the reference's key and has no effect" in caplog.text


def test_every_file_the_run_reads_is_checked(tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "model.safetensors").write_bytes(b"x")
    tok, data = tmp_path / "tokenizer.model", tmp_path / "train.json"
    tok.write_text("x")
    data.write_text("[]")
    over = {"checkpointer.checkpoint_dir": str(llm), "checkpointer.checkpoint_files": ["model.safetensors"],
            "tokenizer._component_": "medcap.models.llama3_tokenizer", "tokenizer.path": str(tok),
            "dataset.source": str(data)}
    TrainConfig.from_config(_cfg(**over)).check()
    for key in ("dataset.source", "tokenizer.path", "checkpointer.checkpoint_dir", "vision_checkpoint",
                "model.vision_pretrained"):
        bad = dict(over, **{key: str(tmp_path / "missing")})
        with pytest.raises(ConfigError, match=rf"{key}=.*missing.*no such"):
            TrainConfig.from_config(_cfg(**bad)).check()
    with pytest.raises(ConfigError, match=r"checkpointer.checkpoint_files=.*other.safetensors"):
        TrainConfig.from_config(_cfg(**dict(over, **{"checkpointer.checkpoint_files": ["other.safetensors"]}))).check()
    with pytest.raises(ConfigError, match=r"optimizer.betass: .*did you mean 'betas'"):
        TrainConfig.from_config(_cfg(**dict(over, **{"optimizer.betass": [0.9, 0.99]}))).check()


def test_torchtune_chat_dataset_is_swapped_and_logged(caplog):
    cfg = {"_component_": "torchtune.datasets.chat_dataset", "source": "t.json", "conversation_style": "sharegpt", "max_seq_len": 9}
    with caplog.at_level(logging.WARNING, logger="medcap.training"):
        out, swapped = resolve_dataset_config(cfg)
    assert swapped and out["_component_"] == "medcap.data.chat_dataset"
    assert {k: out[k] for k in ("source", "conversation_style", "max_seq_len")} == {
        "source": "t.json", "conversation_style": "sharegpt", "max_seq_len": 9
    }
    assert "torchtune.datasets.chat_dataset" in caplog.text and "medcap.data.chat_dataset" in caplog.text
    same, swapped = resolve_dataset_config({"_component_": "medcap.data.chat_dataset"})
    assert not swapped


def test_loss_config():
    assert resolve_loss_config(None)["_component_"] == "medcap.training.LabelTokenCrossEntropy"
    assert resolve_loss_config({"_component_": "torch.nn.CrossEntropyLoss"})["_component_"].endswith(
        "LabelTokenCrossEntropy"
    )
    with pytest.raises(ValueError, match="not supported"):
        resolve_loss_config({"_component_": "my.Loss"})


@pytest.mark.parametrize(
    "value,mode",
    [(False, "no"), (None, "no"), (True, "yes"), ("auto", "auto"), ("AUTO", "auto"), ("True", "yes")],
)
def test_resume_mode(value, mode):
    assert resume_mode(value) == mode


def test_resume_mode_rejects_other_values():
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='sometimes'.*True, False or auto"):
        resume_mode("sometimes")
