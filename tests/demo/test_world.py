"""The demo's synthetic world: deterministic, in OmniMedVQA's layout, held-out images unseen."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.demo._settings import DemoSettings
from medcap.demo._world import (
    DATASET_NAME,
    KINDS,
    LOCATIONS,
    MODALITY_KEYS,
    Finding,
    caption,
    render,
    write_world,
)

# OmniMedVQA's own spellings, typed out here rather than imported, so a typo in the
# package cannot agree with itself.
OMNIMEDVQA_MODALITIES = {
    "CT(Computed Tomography)",
    "X-Ray",
    "Dermoscopy",
    "Fundus Photography",
    "OCT (Optical Coherence Tomography",
    "ultrasound",
    "MR (Mag-netic Resonance Imaging)",
    "Microscopy Images",
}


def _settings(**kw) -> DemoSettings:
    base = dict(n_train=24, n_test=16, questions_per_image=2, image_size=32)
    base.update(kw)
    return DemoSettings(**base)


def _digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".png", ".json")
    }  # the sharegpt files too: their paths are relative, the same wherever the world is written


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = write_world(out, _settings())
    return out, paths


def test_deterministic_and_seed_dependent(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    write_world(again, _settings())
    assert _digest(out) == _digest(again)
    other = tmp_path / "other"
    write_world(other, _settings(seed=1))
    a, b = _digest(out), _digest(other)
    changed = [k for k in a if k.endswith(".png") and a[k] != b.get(k)]
    assert len(changed) == sum(1 for k in a if k.endswith(".png"))


def test_modalities_are_omnimedvqa_strings(world):
    assert set(MODALITY_KEYS) <= OMNIMEDVQA_MODALITIES
    assert 4 <= len(MODALITY_KEYS) <= 8
    out, paths = world
    qs = json.loads(Path(paths["questions"]).read_text())
    assert {q["modality_type"] for q in qs} == set(MODALITY_KEYS)


def test_omnimedvqa_layout(world):
    out, paths = world
    qa_dir = out / "OmniMedVQA" / "QA_information" / "Open-access"
    assert Path(paths["questions"]).parent == qa_dir
    qs = json.loads(Path(paths["questions"]).read_text())
    assert len(qs) == 16 * 2
    required = {"question_id", "dataset", "question_type", "question", "gt_answer", "image_path",
                "option_A", "option_B", "modality_type"}
    ids = set()
    for q in qs:
        assert required <= set(q), q
        assert q["dataset"] == DATASET_NAME
        opts = [q[f"option_{L}"] for L in "ABCD" if f"option_{L}" in q]
        assert len(opts) in (2, 4) and len(set(opts)) == len(opts)
        assert opts.count(q["gt_answer"]) == 1
        # image paths are relative to the OmniMedVQA folder and exist there
        assert not Path(q["image_path"]).is_absolute()
        assert (out / "OmniMedVQA" / q["image_path"]).is_file()
        ids.add(q["question_id"])
    assert len(ids) == len(qs)
    # the generation recipe's reader takes every question
    from medcap.eval import read_omnimedvqa

    items, report = read_omnimedvqa(out)
    assert report["kept"] == len(qs)


def test_answers_follow_from_the_caption(world):
    """Every answer is written in its image's caption (so describing is enough to answer)."""
    out, paths = world
    meta = json.loads(Path(paths["world"]).read_text())
    by_image = {r["image"]: r for r in meta["test"]}
    for q in json.loads(Path(paths["questions"]).read_text()):
        rec = by_image[q["image_path"]]
        cap = rec["caption"]
        f = Finding(rec["modality"], rec["kind"], rec["location"], rec["size"], rec["intensity"])
        assert cap == caption(f)
        assert q["gt_answer"] in cap


def test_sharegpt_files_read_by_the_dataset_code(world):
    """train.json and test.json parse with medcap's own reader, placeholders and images included."""
    from medcap.data import PLACEHOLDER_CHAR, parse_record

    out, paths = world
    for name, n in (("train", 24), ("test", 16)):
        recs = json.loads(Path(paths[name]).read_text())
        assert len(recs) == n
        for r in recs:
            assert r["conversations"][0]["value"] == PLACEHOLDER_CHAR * DemoSettings().num_image_tokens
            assert r["meta"] == {"train": "dir=.", "test": "dir=OmniMedVQA"}[name]  # relative to the JSON's folder
            parsed = parse_record(r, json_dir=Path(paths[name]).parent)
            assert parsed.image_path.is_file()
            assert Image.open(parsed.image_path).size == (32, 32)


def test_held_out_images_are_unseen(world):
    out, paths = world
    train = {hashlib.sha256(Image.open(p).tobytes()).hexdigest() for p in (out / "images" / "train").glob("*.png")}
    test = {hashlib.sha256(Image.open(p).tobytes()).hexdigest()
            for p in (out / "OmniMedVQA" / "Images" / DATASET_NAME).glob("*.png")}
    assert len(train) == 24 and len(test) == 16
    assert not train & test
    meta = json.loads(Path(paths["world"]).read_text())
    assert not {r["image"] for r in meta["train"]} & {r["image"] for r in meta["test"]}


def test_attributes_change_the_pixels():
    """Each attribute is visible: changing it alone changes the lesion's pixels."""
    base = Finding(MODALITY_KEYS[0], KINDS[0], LOCATIONS[0], "large", "bright")
    img = render(base, np.random.default_rng(0), 64).astype(int)
    for change in (dict(kind=KINDS[1]), dict(location=LOCATIONS[3]), dict(size="small"), dict(intensity="dark"),
                   dict(modality=MODALITY_KEYS[4])):
        f = Finding(**{**base.__dict__, **change})
        other = render(f, np.random.default_rng(0), 64).astype(int)
        assert np.abs(other - img).max() > 100, change


@pytest.mark.parametrize("location", LOCATIONS)
def test_lesion_sits_in_its_quadrant(location):
    """A bright lesion on CT: the bright pixels inside the body (away from the bright
    rim) lie in the quadrant the caption names."""
    f = Finding("CT(Computed Tomography)", "nodule", location, "large", "bright")
    img = render(f, np.random.default_rng(3), 64).astype(float).mean(-1) / 255
    yy, xx = np.mgrid[0:64, 0:64]
    inner = np.hypot(yy - 31.5, xx - 31.5) < 20
    ys, xs = np.nonzero((img > 0.7) & inner)
    assert ys.size > 10
    vert, horiz = location.split()
    assert (ys.mean() < 31.5) == (vert == "upper")
    assert (xs.mean() < 31.5) == (horiz == "left")


def test_bad_split_and_modality_are_clear(tmp_path):
    from medcap.demo._world import make_split

    with pytest.raises(ValueError, match="split"):
        make_split(tmp_path, "valid", 1)
    with pytest.raises(ValueError, match="unknown modalities"):
        make_split(tmp_path, "train", 1, modalities=["PET"])


def test_a_moved_world_still_loads(tmp_path, monkeypatch):
    """Every path the world's files hold is relative to their own folder: after `mv`
    the dataset, caption and OmniMedVQA readers find every image at the new place."""
    import shutil

    from medcap.data import parse_record, read_index
    from medcap.eval import read_caption_set, read_omnimedvqa

    old = tmp_path / "old" / "world"
    write_world(old, _settings(n_train=6, n_test=5, questions_per_image=1))
    new = tmp_path / "elsewhere" / "moved"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    monkeypatch.chdir(tmp_path)  # not the world's folder: nothing may resolve against the working directory
    for f in new.rglob("*.json"):
        assert str(tmp_path / "old") not in f.read_text(), f"{f} names the folder it was written in"

    index = read_index(new / "train.json")
    train = [parse_record(index[i], json_dir=index.file_of(i).parent).image_path for i in range(len(index))]
    captions, report = read_caption_set(new / "test.json")
    questions, _ = read_omnimedvqa(new)
    assert len(train) == 6 and report["kept"] == 5 and report["bad"] == 0 and len(questions) == 5
    images = [Path(p) for p in train + [c.file for c in captions] + [q.file for q in questions]]  # the files loaded
    for p in images:
        assert p.resolve().is_relative_to(new.resolve()) and p.is_file(), p
    # the captions' and the questions' images are the same five held-out files
    assert {p.resolve() for p in images[6:11]} == {p.resolve() for p in images[11:]}


# ---- held-out combinations

# The caption grammar read back independently of the package: opening phrase -> modality.
PHRASES = {
    "CT scan": "CT(Computed Tomography)", "Chest X-ray": "X-Ray", "MRI scan": "MR (Mag-netic Resonance Imaging)",
    "Ultrasound image": "ultrasound", "Dermoscopy image": "Dermoscopy", "Fundus photography": "Fundus Photography",
    "OCT scan": "OCT (Optical Coherence Tomography", "Microscopy image": "Microscopy Images",
}
CAPTION_RE = re.compile(r"^(.+) showing a (small|large) (bright|dark) (nodule|cyst|mass|calcification) "
                        r"in the (upper left|upper right|lower left|lower right) region\.$")


def _triples_of(sharegpt_file: Path) -> list:
    """(modality, kind, location) of every record's caption, parsed from the file's text."""
    out = []
    for r in json.loads(sharegpt_file.read_text()):
        m = CAPTION_RE.match(r["conversations"][1]["value"])
        assert m, r["conversations"][1]["value"]
        out.append((PHRASES[m.group(1)], m.group(4), m.group(5)))
    return out


def test_held_out_triples_are_new_combinations_of_seen_parts():
    from medcap.demo._world import held_out_combinations

    held = held_out_combinations(0)
    assert len(held) == 16 and len(set(held)) == 16
    for mod in MODALITY_KEYS:  # two per modality, differing in kind and in location
        mine = [t for t in held if t[0] == mod]
        assert len(mine) == 2 and mine[0][1] != mine[1][1] and mine[0][2] != mine[1][2]
    pairs = [(k, loc) for _, k, loc in held]
    assert sorted(pairs) == sorted((k, loc) for k in KINDS for loc in LOCATIONS)  # every pair held out once
    assert held_out_combinations(1) != held and held_out_combinations(0) == held
    assert held_out_combinations(0, 0) == () and len(held_out_combinations(0, 1)) == 8
    with pytest.raises(ValueError, match="held_out_per_modality"):
        held_out_combinations(0, 3)


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("big_world")
    write_world(out, _settings(n_train=600, n_test=64, image_size=16, questions_per_image=5))
    return out


def test_held_out_combinations_never_reach_vision_training(big_world):
    """Recounted from the files: no training caption shows a held-out triple, though every
    pair of their attributes occurs in training; the unseen test images are exactly those
    of held-out triples, and their captions occur nowhere in training."""
    meta = json.loads((big_world / "world.json").read_text())
    held = {tuple(t) for t in meta["held_out"]}
    assert meta["held_out_attributes"] == ["modality", "kind", "location"] and len(held) == 16
    train = _triples_of(big_world / "train.json")
    assert len(train) == 600 and not set(train) & held
    for a, b in ((0, 1), (0, 2), (1, 2)):  # the parts of every held-out triple were seen, pair by pair
        seen_pairs = {(t[a], t[b]) for t in train}
        assert {(t[a], t[b]) for t in held} <= seen_pairs
    test = _triples_of(big_world / "test.json")
    records = json.loads((big_world / "test.json").read_text())
    kinds = {r["image"]: r["combination"] for r in meta["test"]}
    assert [kinds[r["image"]] for r in records] == ["unseen" if t in held else "seen" for t in test]
    train_captions = {r["conversations"][1]["value"] for r in json.loads((big_world / "train.json").read_text())}
    unseen_captions = {r["conversations"][1]["value"] for r, t in zip(records, test) if t in held}
    assert unseen_captions and not unseen_captions & train_captions


def test_test_split_halves(big_world):
    """Half of the test images show seen combinations, half unseen, every modality in both;
    the questions follow their images."""
    meta = json.loads((big_world / "world.json").read_text())
    halves = {s: [r for r in meta["test"] if r["combination"] == s] for s in ("seen", "unseen")}
    assert len(halves["seen"]) == len(halves["unseen"]) == 32
    for part in halves.values():
        assert {r["modality"] for r in part} == set(MODALITY_KEYS)
    qs = json.loads((big_world / "OmniMedVQA" / "QA_information" / "Open-access" / f"{DATASET_NAME}.json").read_text())
    unseen_images = {r["image"] for r in halves["unseen"]}
    assert sum(q["image_path"] in unseen_images for q in qs) == 32 * 5


def test_no_held_out_setting_keeps_every_combination(tmp_path):
    write_world(tmp_path, _settings(n_train=8, n_test=16, held_out_per_modality=0))
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["held_out"] == [] and {r["combination"] for r in meta["test"]} == {"seen"}
