"""`medcap export`: the folder loads with transformers alone, in a process where medcap cannot
be imported, and its greedy tokens are medcap's; medcap reads the folder back; a broken
folder is named in one line, by medcap and by the folder's own code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_child import MAX_NEW, QUESTIONS, run_child


def _medcap(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "MEDCAP_LLM"}
    return subprocess.run([sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _cut(tokens, stops):
    """Generated tokens up to the first stop token (transformers keeps it, medcap's engine does not)."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@pytest.fixture(scope="module")
def broken(trained, exported, tmp_path_factory):
    """Copies of the folders with one file removed each."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, source, missing in (("no_vision", exported["pointer"], "vision.safetensors"),
                                  ("no_llm_shard", exported["with_llm"], "llm.safetensors"),
                                  ("no_tokenizer", exported["pointer"], "original/tokenizer.model"),
                                  ("no_config", exported["pointer"], "config.json")):
        dest = root / name
        shutil.copytree(source, dest)
        (dest / missing).unlink()
        out[name] = (str(dest), missing)
    return out


@pytest.fixture(scope="module")
def child(trained, exported, broken, tmp_path_factory):
    """One transformers-only process for the module: both folders generate, the broken ones fail."""
    plan = {
        "generate": [[exported[kind], img, q, MAX_NEW] for kind in ("pointer", "with_llm")
                     for q in QUESTIONS for img in trained["images"]],
        "broken": [broken["no_vision"][0], broken["no_llm_shard"][0]],
    }
    return run_child(plan, str(tmp_path_factory.mktemp("child")))


@pytest.mark.slow
@pytest.mark.integration
def test_the_process_that_loads_the_folder_cannot_import_medcap(child):
    proof = child["proof"]
    assert proof["find_spec_is_none"] is True
    assert proof["import"] == "ModuleNotFoundError: No module named 'medcap'"
    assert proof["flags"] == [1, 1]  # isolated, no site: no .pth file ran, so no editable finder was installed
    assert not any("editable" in f.lower() for f in proof["finders"]), proof["finders"]
    assert proof["loaded"] == []  # nothing named medcap was imported while loading and generating
    assert {r["class"] for r in child["rows"]} == {"MedcapForCausalLM"}


@pytest.mark.slow
@pytest.mark.integration
def test_transformers_greedy_tokens_equal_medcaps_for_captions_and_questions(trained, exported, reference, child):
    jobs, rows = reference["jobs"], child["rows"]
    assert len(trained["images"]) >= 8 and len(rows) == 2 * len(jobs)
    # the answers depend on the image (else a wrong transform could pass unseen)
    assert len({tuple(t) for t in reference["tokens"][: len(trained["images"])]}) >= 6
    for k, row in enumerate(rows):
        image, question = jobs[k % len(jobs)]
        assert (row["image"], row["question"]) == (image, question)
        assert row["pixels"] == reference["pixels"][image], image  # the processor's pixels are medcap's, bit for bit
        assert row["prompt"] == reference["prompts"][k % len(jobs)], row["folder"]  # the processor's prompt ids
        assert _cut(row["new"], reference["stops"]) == reference["tokens"][k % len(jobs)], (row["folder"], image, question)
        assert row["dtype"] == "torch.float32"  # the checkpoint's dtype, from config.json


@pytest.mark.slow
@pytest.mark.integration
def test_a_broken_folder_is_named_by_the_folders_own_code(broken, child):
    for name in ("no_vision", "no_llm_shard"):
        folder, missing = broken[name]
        message = child["broken"][folder]
        assert message.startswith("FileNotFoundError: ") and missing in message and "incomplete" in message, message


def test_medcap_reads_the_folders_back(trained, exported, reference):
    import medcap

    for folder in exported.values():
        m = medcap.load(folder, device="cpu", max_new_tokens=MAX_NEW)
        assert m.caption(trained["images"]) == reference["captions"]
        assert m.ask(trained["images"][0], QUESTIONS[1]) == reference["model"].ask(trained["images"][0], QUESTIONS[1])
    from medcap.serve._main import read_model_config

    conf = read_model_config("checkpoint/generate", [f"vision_checkpoint={exported['with_llm']}"])  # medcap serve's
    assert conf.checkpointer.checkpoint_dir == exported["with_llm"] and conf.dtype == "fp32"
    assert conf.checkpointer.checkpoint_files == ["llm.safetensors"]
    config = json.loads((Path(exported["with_llm"]) / "config.json").read_text())
    assert config["llm_included"] is True and config["llm_files"] == ["llm.safetensors"]
    assert os.path.samefile(Path(exported["with_llm"]) / "llm.safetensors", Path(trained["llm"]["checkpoint_dir"])
                            / "model.safetensors")  # a hard link on this file system, not a copy


@pytest.mark.slow
@pytest.mark.integration
def test_caption_and_run_generate_take_the_folder(trained, exported, reference, tmp_path):
    images = trained["images"][:3]
    res = _medcap("caption", *images, "--checkpoint", exported["with_llm"], "--max-new-tokens", str(MAX_NEW),
                  "--out", str(tmp_path / "c.jsonl"))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == reference["captions"][:3]
    res = _medcap("run", "generate", f"vision_checkpoint={exported['pointer']}", f"image={images[0]}", "device=cpu",
                  "temperature=0", "top_k=null", f"max_new_tokens={MAX_NEW}", f"output_dir={tmp_path / 'out'}")
    assert res.returncode == 0, res.stderr
    assert "checkpoint/generate.yaml" in res.stderr  # no --config: the model came from the folder
    assert f"{images[0]}: {reference['captions'][0]}" in res.stdout


def test_a_broken_folder_is_one_line_from_medcap(broken):
    import medcap

    for name, (folder, missing) in broken.items():
        if name == "no_llm_shard":
            continue  # the pointer folders only: medcap reads the LLM from the base folder
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            medcap.load(folder, device="cpu")
        assert missing in str(e.value) and "\n" not in str(e.value), str(e.value)
    res = _medcap("caption", __file__, "--checkpoint", broken["no_vision"][0])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("medcap caption: error: ") and "vision.safetensors is missing" in last


def test_the_folder_holds_what_transformers_and_the_hub_need(trained, exported):
    folder = Path(exported["pointer"])
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_medcap.py", "modeling_medcap.py", "processing_medcap.py",
            "vision.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "preprocessor_config.json", "processor_config.json", "README.md",
            "original"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "medcap" and config["architectures"] == ["MedcapForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_medcap.MedcapForCausalLM"
    assert config["base_llm"] == str(Path(trained["llm"]["checkpoint_dir"]).resolve())
    # the tiny tokenizer's ids, by hand: 256 bytes, then <|begin_of_text|> 256, <|end_of_text|> 257, ...
    assert (config["image_token_id"], config["num_image_tokens"], config["bos_token_id"]) == (268, 4, 256)
    assert sorted(config["eos_token_id"]) == [257, 264, 265]  # end_of_text, eom, eot
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["max_new_tokens"] == MAX_NEW
    for code in ("configuration_medcap.py", "modeling_medcap.py", "processing_medcap.py"):
        text = (folder / code).read_text()
        assert not [line for line in text.splitlines() if line.lstrip().startswith(("import medcap", "from medcap"))]
    assert "<|image|>' * 4" in (folder / "chat_template.jinja").read_text()


def test_the_model_card_tells_training_scores_use_and_licence(trained, tmp_path):
    from medcap.export import export_model

    results = tmp_path / "results"
    results.mkdir()
    # a scored OmniMedVQA file: CT 1 of 2 right, MR 1 of 1: macro accuracy (0.5 + 1) / 2 = 75 %
    (results / "omnimedvqa-no_cond_desc-raw-meta_model_last-0_50-0.75.csv").write_text(
        "modality_type,correct\nCT,1\nCT,0\nMR,1\n", encoding="utf-8")
    llm = Path(trained["llm"]["checkpoint_dir"])
    folder = export_model(trained["ckpt"], str(tmp_path / "card"), results=[str(results)])
    card = (folder / "README.md").read_text()
    assert "| meta_model_last | 75.0 |" in card
    assert "| recipe | full_finetune_single_device |" in card and "| optimizer steps | 7 |" in card
    assert "Not for diagnosis" in card and "license: other" in card and f"base_model: {llm.resolve()}" in card
    assert "hf upload YOUR_ORG/YOUR_MODEL" in card


def test_a_licence_in_the_llm_folder_is_named_and_copied(trained, tmp_path):
    from medcap.export import export_model

    llm = tmp_path / "llm"
    shutil.copytree(trained["llm"]["checkpoint_dir"], llm)
    (llm / "LICENSE").write_text("LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\nterms...\n")
    (llm / "README.md").write_text("---\nlicense: llama3.1\n---\n# the model\n")
    folder = export_model(trained["ckpt"], str(tmp_path / "out"), llm=str(llm))
    assert "license_name: llama3.1" in (folder / "README.md").read_text()
    assert (folder / "LICENSE").read_text().startswith("LLAMA 3.1 COMMUNITY LICENSE AGREEMENT")


def test_a_reference_pt_exports_with_a_config_and_not_without(trained, tmp_path):
    from medcap.config._from_checkpoint import read_metadata
    from medcap.export import export_model

    res = _medcap("export", trained["pt"], "--out", str(tmp_path / "nope"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--config custom_generation_config" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "nope").exists()
    folder = export_model(trained["pt"], str(tmp_path / "pt"), config="tiny/generate",
                          overrides=[f"assets_dir={trained['root']}"])
    meta = read_metadata(folder)
    assert meta["model"] == {"_component_": "medcap.models.medcap_tiny", "vocab_size": 268, "image_token_id": 268,
                             "num_image_tokens": 4, "vision": "biomedclip"}
    assert meta["export"]["llm_included"] is False


def test_export_refuses_an_existing_folder_in_one_line(trained, exported):
    res = _medcap("export", trained["ckpt"], "--out", exported["pointer"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("medcap export: error: ") and "--force" in res.stderr
