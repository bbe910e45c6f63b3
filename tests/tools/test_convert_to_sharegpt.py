"""tools/convert_to_sharegpt.py on tiny trees built in the reference's input layouts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.data import convert_main
from medcap.data._converter import CAPTION_INSTRUCTIONS

REPO = Path(__file__).resolve().parents[2]
PH = "\u2460"


def _img(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")


def _csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_pmcoa(root: Path) -> None:
    d = root / "pmc_oa"
    for n in ("a.jpg", "b.jpg"):
        _img(d / "caption_T060_filtered_top4_sep_v0_subfigures" / n)
    _jsonl(d / "train.jsonl", [
        {"image": "a.jpg", "caption": "Panel \u2460 shows a mass."},
        {"image": "missing.jpg", "caption": "lost"},
        {"image": "b.jpg", "caption": "CT of the chest."},
    ])


def make_vqarad(root: Path) -> None:
    d = root / "VQA_RAD"
    _img(d / "VQA_RAD Image Folder" / "synpic1.jpg")
    _img(d / "VQA_RAD Image Folder" / "synpic2.jpg")
    _json(d / "train_text.json", [{"image_name": "synpic1.jpg", "text": "an axial CT"}, {"image_name": "nope.jpg", "text": "x"}])
    _json(d / "test_text.json", [{"image_name": "synpic2.jpg", "text": "a chest x-ray"}])


def make_textplus(root: Path, medicat: bool = True) -> None:
    d = root / "PMC-VQA-text"
    _img(d / "images" / "pv1.jpg")
    _json(d / "train_text.json", [{"Figure_path": "pv1.jpg", "text": "PMC-VQA caption"}])
    _img(d / "train" / "ROCOv2_1.jpg")
    _csv(d / "train_captions.csv", ["ID", "Caption"], [["ROCOv2_1", "ROCO caption"], ["ROCOv2_2", "no image"]])
    _img(d / "images_med60k" / "images" / "m1.jpg")
    _json(d / "train_text_med60k.json", [{"image": "m1.jpg", "text": "LLaVA-Med caption"}])
    _img(d / "images_vision" / "v1.jpg")
    _img(d / "images_vision" / "v2.jpg")
    _json(d / "PubMedVision_Alignment_VQA.json", [
        {"image": ["images/v1.jpg", "images/absent.jpg"],
         "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "PubMedVision answer"}]},
        {"image": ["images/v2.jpg"], "conversations": [{"from": "gpt", "value": "second answer"}]},
    ])
    if medicat:
        _img(d / "release" / "figures" / "h1_f1.png")
        _img(d / "release" / "figures" / "ffd83b6453f94f2a1ddb346e324f5bdbf228c1f3_4-Figure3-1.png")
        _jsonl(d / "release" / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", [
            {"pdf_hash": "h1", "fig_uri": "f1.png", "s2_caption": "MedICaT caption", "s2orc_references": ["ref one", "ref two"]},
            {"pdf_hash": "ffd83b6453f94f2a1ddb346e324f5bdbf228c1f3", "fig_uri": "4-Figure3-1.png", "s2_caption": "broken"},
        ])
    _img(d / "images_patients" / "images" / "PMC111_1.jpg")
    _img(d / "images_patients" / "images" / "PMC111_2.jpg")
    _img(d / "images_patients" / "images" / "PMC999_1.jpg")  # no case summary in the table
    _csv(d / "PMC-Patients.csv", ["patient_id", "file_path", "patient"], [
        ["1", "comm/PMC001xxxxxx/PMC111.xml", "Case one."],
        ["2", "comm/PMC001xxxxxx/PMC111.xml", "Case two."],
        ["3", "comm/PMC002xxxxxx/PMC222.xml", "Case without images."],
    ])


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _pairs(records):
    return [(r["image"], r["conversations"][1]["value"]) for r in records]


def _check_format(records, folder: Path, instruction="none"):
    """The reference's record layout; ``meta``'s ``dir=`` relative to ``folder`` (the JSON file's)."""
    for r in records:
        assert set(r) == {"conversations", "image", "meta"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        if instruction == "none":
            assert human["value"] == PH * 50
        else:
            head, sep, tail = human["value"].partition("\n\n")
            assert head == PH * 50 and sep and tail in CAPTION_INSTRUCTIONS
        assert PH not in gpt["value"]
        d = r["meta"].split("=", 1)[1]
        assert r["meta"].startswith("dir=") and not os.path.isabs(d)
        assert (folder / d / r["image"]).is_file()


def test_pmcoa(tmp_path, capsys):
    make_pmcoa(tmp_path)
    assert convert_main(["--dataset", "pmcoa", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    recs = _load(tmp_path / "out" / "pmcoa_train.json")
    _check_format(recs, tmp_path / "out")
    assert recs[0]["meta"] == "dir=../pmc_oa/caption_T060_filtered_top4_sep_v0_subfigures"  # by hand
    assert _pairs(recs) == [("a.jpg", "Panel (1) shows a mass."), ("b.jpg", "CT of the chest.")]
    assert report["written"] == {"pmcoa_train.json": 2}
    assert report["skipped"] == {"PMC-OA": {"missing image": 1}}


@pytest.mark.parametrize("instruction", ["random", "fixed"])
def test_vqarad_with_instructions(tmp_path, capsys, instruction):
    make_vqarad(tmp_path)
    args = ["--dataset", "vqarad", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
            "--instruction", instruction, "--no-progress"]
    assert convert_main(args) == 0
    train, test = _load(tmp_path / "out" / "vqarad_train.json"), _load(tmp_path / "out" / "vqarad_test.json")
    _check_format(train + test, tmp_path / "out", instruction)
    assert _pairs(train) == [("synpic1.jpg", "an axial CT")] and _pairs(test) == [("synpic2.jpg", "a chest x-ray")]
    if instruction == "fixed":
        assert train[0]["conversations"][0]["value"].endswith(CAPTION_INSTRUCTIONS[0])
    # deterministic: a second run writes the same file
    first = (tmp_path / "out" / "vqarad_train.json").read_bytes()
    assert convert_main(args) == 0
    assert (tmp_path / "out" / "vqarad_train.json").read_bytes() == first


def test_textplus_chain(tmp_path, capsys):
    make_textplus(tmp_path)
    make_pmcoa(tmp_path)
    assert convert_main(["--dataset", "textplus", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    base = [("pv1.jpg", "PMC-VQA caption"), ("ROCOv2_1.jpg", "ROCO caption"), ("m1.jpg", "LLaVA-Med caption"),
            ("v1.jpg", "PubMedVision answer"), ("v2.jpg", "second answer")]
    medicat = [("h1_f1.png", "MedICaT caption ref one ref two")]
    pmcoa = [("a.jpg", "Panel (1) shows a mass."), ("b.jpg", "CT of the chest.")]
    patients = [("PMC111_1.jpg", "Case one."), ("PMC111_1.jpg", "Case two."),
                ("PMC111_2.jpg", "Case one."), ("PMC111_2.jpg", "Case two.")]
    t = _load(out / "textplus_train.json")
    tp = _load(out / "textplus_pmcoa_train.json")
    tpp = _load(out / "textplus_pmcoa_patients_train.json")
    assert _pairs(t) == base
    assert _pairs(tp) == base + medicat + pmcoa
    assert _pairs(tpp) == base + medicat + pmcoa + patients
    _check_format(tpp, out)
    assert report["written"] == {"textplus_train.json": 5, "textplus_pmcoa_train.json": 8,
                                 "textplus_pmcoa_patients_train.json": 12}
    assert report["skipped"]["ROCOv2"] == {"missing image": 1}
    assert report["skipped"]["MedICaT"] == {"known-broken file": 1}
    assert report["skipped"]["PMC-Patients"] == {"image without case summary": 1}


def test_missing_inputs_are_reported(tmp_path, capsys):
    assert convert_main(["--dataset", "pmcoa", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "PMC-OA index not found" in capsys.readouterr().err
    assert convert_main(["--dataset", "textplus", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "PMC-VQA-text" in capsys.readouterr().err

    # only some textplus sources, no MedICaT, no PMC-OA: what exists is converted, the rest reported
    make_textplus(tmp_path, medicat=False)
    (tmp_path / "PMC-VQA-text" / "train_captions.csv").unlink()
    assert convert_main(["--dataset", "textplus", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "o"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    report = json.loads(cap.out)
    assert report["written"] == {"textplus_train.json": 4}
    assert any("ROCOv2" in w and "train_captions.csv" in w for w in report["warnings"])
    assert any("PMC-OA" in w for w in report["warnings"])
    assert "MedICaT not present" in cap.err
    assert not (tmp_path / "o" / "textplus_pmcoa_train.json").exists()


@pytest.mark.integration
def test_script_and_dataset_roundtrip(tmp_path):
    """The script as users run it, and its output read by the training dataset."""
    make_pmcoa(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_sharegpt.py"), "--dataset", "pmcoa",
                          "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["written"] == {"pmcoa_train.json": 2}
    assert "PMC-OA" in res.stderr  # progress bar / summary

    from medcap.data import image_chat_dataset
    from medcap.models import llama3_tokenizer, write_tiktoken_tokenizer

    paths = write_tiktoken_tokenizer(tmp_path / "tok")
    tok = llama3_tokenizer(str(paths["path"]), str(paths["special_tokens_path"]))
    ds = image_chat_dataset(tok, source=tmp_path / "out" / "pmcoa_train.json", num_image_tokens=50, image_size=16,
                            bad_samples="raise")
    items = [ds[i] for i in range(len(ds))]
    assert all(it["tokens"].count(tok.image_id) == 50 and it["image"].shape == (3, 16, 16) for it in items)


def test_old_flag_spellings_still_work(tmp_path, capsys):
    make_pmcoa(tmp_path)
    assert convert_main(["--dataset", "pmcoa", "--data_dir", str(tmp_path), "--save_dir", str(tmp_path / "old"),
                         "--no_progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["written"] == {"pmcoa_train.json": 2}
    assert (tmp_path / "old" / "pmcoa_train.json").is_file()


def test_a_record_with_a_lone_surrogate_is_skipped_and_named(tmp_path, capsys):
    """A broken \\u escape (a lone surrogate) cannot be written to a UTF-8 file: the record is
    skipped, counted and named, as validate-data and training do; the rest is converted."""
    make_pmcoa(tmp_path)
    index = tmp_path / "pmc_oa" / "train.jsonl"
    # written by hand: json.dumps would not make the broken escape
    index.write_text(index.read_text() + '{"image": "b.jpg", "caption": "cut \\ud83d here"}\n', encoding="utf-8")
    assert convert_main(["--dataset", "pmcoa", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
                         "--no-progress"]) == 0  # fmt: skip
    cap = capsys.readouterr()
    report = json.loads(cap.out)
    assert report["skipped"] == {"PMC-OA": {"missing image": 1, "lone surrogate": 1}}
    assert report["written"] == {"pmcoa_train.json": 2}
    assert f"PMC-OA: {index} item 3: the text holds a lone surrogate \\ud83d at character 4" in cap.err
    assert _pairs(_load(tmp_path / "out" / "pmcoa_train.json")) == [("a.jpg", "Panel (1) shows a mass."),
                                                                    ("b.jpg", "CT of the chest.")]


def test_a_converted_data_set_moved_with_its_images_still_loads(tmp_path, monkeypatch):
    """meta's dir= is relative to the JSON file: the loader finds the images after the
    whole tree moved, from any working folder."""
    from medcap.data import parse_record, read_index

    make_vqarad(tmp_path / "a")
    assert convert_main(["--dataset", "vqarad", "--data-dir", str(tmp_path / "a"),
                         "--save-dir", str(tmp_path / "a" / "medcap"), "--no-progress"]) == 0  # fmt: skip
    (tmp_path / "a").rename(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    index = read_index(tmp_path / "b" / "medcap" / "vqarad_train.json")
    rec = parse_record(index[0], json_dir=index.file_of(0).parent)
    assert rec.image_path.resolve() == (tmp_path / "b" / "VQA_RAD" / "VQA_RAD Image Folder" / "synpic1.jpg")
    assert rec.image_path.is_file()


def test_invalid_jsonl_lines_are_counted_in_the_summary(tmp_path, capsys):
    make_pmcoa(tmp_path)
    index = tmp_path / "pmc_oa" / "train.jsonl"
    index.write_text(index.read_text() + '{"image": "b.jpg", "caption": \n' + "not json\n", encoding="utf-8")
    assert convert_main(["--dataset", "pmcoa", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
                         "--no-progress"]) == 0  # fmt: skip
    cap = capsys.readouterr()
    report = json.loads(cap.out)
    assert report["skipped"] == {"PMC-OA": {"invalid JSON line": 2, "missing image": 1}}
    assert report["written"] == {"pmcoa_train.json": 2}
    assert "train.jsonl line 4: invalid JSON" in cap.err and "line 5" in cap.err


@pytest.mark.parametrize(
    "dataset, make, index, rows, field",
    [
        # VQA-RAD's index with LLaVA-Med's field names
        ("vqarad", make_vqarad, "VQA_RAD/train_text.json", [{"image": "synpic1.jpg", "text": "x"}], "image_name"),
        ("pmcoa", make_pmcoa, "pmc_oa/train.jsonl", [{"image": "a.jpg", "text": "x"}], "caption"),
        ("textplus", make_textplus, "PMC-VQA-text/PubMedVision_Alignment_VQA.json",
         [{"image": ["images/v1.jpg"], "answer": "x"}], "conversations"),
    ],
)
def test_a_field_missing_from_every_record_is_an_error_naming_it(tmp_path, capsys, dataset, make, index, rows, field):
    make(tmp_path)
    path = tmp_path / index
    (_jsonl if path.suffix == ".jsonl" else _json)(path, rows)
    assert convert_main(["--dataset", dataset, "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
                         "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert f"has the field '{field}'" in err and path.name in err
    assert "Traceback" not in err


def test_a_field_missing_from_some_records_only_skips_them(tmp_path, capsys):
    make_vqarad(tmp_path)
    _json(tmp_path / "VQA_RAD" / "train_text.json",
          [{"image_name": "synpic1.jpg", "text": "an axial CT"}, {"image": "synpic2.jpg", "text": "other layout"}])
    assert convert_main(["--dataset", "vqarad", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
                         "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["skipped"] == {"VQA-RAD train": {"no image name": 1}}


def test_a_json_index_that_is_not_json_names_the_file(tmp_path, capsys):
    make_vqarad(tmp_path)
    (tmp_path / "VQA_RAD" / "test_text.json").write_text("[{oops", encoding="utf-8")
    assert convert_main(["--dataset", "vqarad", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
                         "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "test_text.json is not valid JSON" in err


def _fields_the_converter_reads():
    """The field and column names passed to the converter's schema checks, read from its source."""
    import ast

    tree = ast.parse((REPO / "medcap" / "data" / "_convert.py").read_text(encoding="utf-8"))
    wanted = {"_pairs": slice(3, 5), "require_fields": slice(3, 4), "read_csv": slice(1, 2)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in wanted:
            for arg in node.args[wanted[node.func.id]]:
                found |= {n.value for n in ast.walk(arg) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return found


def test_datasets_readme_documents_every_field_read():
    fields = _fields_the_converter_reads()
    # the hand-written expectation keeps the AST walk honest
    assert {"image", "caption", "image_name", "text", "Figure_path", "ID", "Caption", "conversations",
            "pdf_hash", "fig_uri", "s2_caption", "file_path", "patient"} <= fields  # fmt: skip
    doc = (REPO / "datasets" / "README.md").read_text(encoding="utf-8")
    assert not [f for f in sorted(fields) if f"`{f}`" not in doc]


@pytest.mark.integration
def test_a_run_into_a_log_file_writes_plain_lines_and_no_carriage_return(tmp_path):
    """Not a terminal: each source's progress is one plain line (medcap._io.progress), not a redrawn bar."""
    make_pmcoa(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "convert.log"
    with open(log, "w", encoding="utf-8") as out:
        res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_sharegpt.py"), "--dataset", "pmcoa",
                              "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out")],
                             stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120)  # fmt: skip
    text = log.read_text(encoding="utf-8")
    assert res.returncode == 0, text
    assert "\r" not in text
    assert "PMC-OA: 3/3 rec (100%)" in text
