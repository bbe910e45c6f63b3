"""A synthetic, medical-looking image world for the offline demo.

Every image shows one *finding* on a background whose look identifies its
*modality* (named with OmniMedVQA's own modality strings). A finding has a kind
(its shape), a location (a quadrant), a size and an intensity (brighter or
darker than its surroundings). A fixed grammar turns these attributes into a
caption, so the caption is fully determined by the pixels, and multiple-choice
questions about one attribute each are fully determined by the caption.

Whole combinations are held out (``held_out_combinations``): a few (modality,
kind, location) triples never occur in the training split, though each of their
pairs does; half of the test split shows them ("unseen"), half shows triples
training saw ("seen"), always on new images. Everything is deterministic given
the seed: image ``i`` of a split is drawn from its own generator seeded by
``(seed, split, i)``, so a re-run rebuilds the same files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medcap._io import atomic_write
from medcap.data import PLACEHOLDER_CHAR


@dataclass(frozen=True)
class Modality:
    """One imaging modality of the world."""

    key: str  # OmniMedVQA's exact ``modality_type`` string
    name: str  # the name used in answers and options ("CT"); the caption contains it
    phrase: str  # how a caption opens ("CT scan")


# OmniMedVQA spells its modalities this way (typos and the missing bracket included);
# the evaluation keeps only questions whose modality_type is one of these strings.
MODALITIES: Tuple[Modality, ...] = (
    Modality("CT(Computed Tomography)", "CT", "CT scan"),
    Modality("X-Ray", "X-ray", "Chest X-ray"),
    Modality("MR (Mag-netic Resonance Imaging)", "MRI", "MRI scan"),
    Modality("ultrasound", "Ultrasound", "Ultrasound image"),
    Modality("Dermoscopy", "Dermoscopy", "Dermoscopy image"),
    Modality("Fundus Photography", "Fundus photography", "Fundus photography"),
    Modality("OCT (Optical Coherence Tomography", "OCT", "OCT scan"),
    Modality("Microscopy Images", "Microscopy", "Microscopy image"),
)
MODALITY_KEYS: Tuple[str, ...] = tuple(m.key for m in MODALITIES)
# Modality questions offer the four modalities of the answer's family.
MODALITY_GROUPS: Tuple[Tuple[str, ...], ...] = (MODALITY_KEYS[:4], MODALITY_KEYS[4:])

KINDS: Tuple[str, ...] = ("nodule", "cyst", "mass", "calcification")
LOCATIONS: Tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")
SIZES: Tuple[str, ...] = ("small", "large")
INTENSITIES: Tuple[str, ...] = ("bright", "dark")

# (OmniMedVQA question_type, attribute, question text)
QUESTION_TYPES: Tuple[Tuple[str, str, str], ...] = (
    ("Modality Recognition", "modality", "What imaging modality was used to take this image?"),
    ("Disease Diagnosis", "kind", "What kind of finding is seen in the image?"),
    ("Anatomy Identification", "location", "Where is the lesion located?"),
    ("Lesion Grading", "size", "How large is the lesion?"),
    ("Other Biological Attributes", "intensity", "How does the lesion appear compared with its surroundings?"),
)

DATASET_NAME = "MedcapDemo"

# Lesion geometry, as fractions of the image side. The centre sits 0.11-0.14 of the
# side away from both middle lines, so with the demo's 16-pixel patches on 64-pixel
# images a lesion lies inside one of the four central patches: the ViT then reads
# location from *which* patch holds it and kind, size and intensity from its content.
LESION_OFFSET = (0.135, 0.155)
RADIUS_SMALL = 0.085
RADIUS_LARGE = 0.14
SPLIT_SEEDS = {"train": 1, "test": 2}


@dataclass(frozen=True)
class Finding:
    """The attributes of one image; the caption and answers follow from them."""

    modality: str  # a Modality.key
    kind: str
    location: str
    size: str
    intensity: str

    @property
    def modality_info(self) -> Modality:
        return MODALITIES[MODALITY_KEYS.index(self.modality)]

    def answer(self, attribute: str) -> str:
        if attribute == "modality":
            return self.modality_info.name
        return getattr(self, attribute)


def caption(f: Finding) -> str:
    """The grammar: 'CT scan showing a large bright nodule in the upper left region.'"""
    return f"{f.modality_info.phrase} showing a {f.size} {f.intensity} {f.kind} in the {f.location} region."


def options_for(attribute: str, f: Finding, rng: np.random.Generator, shuffle: bool = False) -> List[str]:
    """The answer options of a question about ``attribute`` (the right one among them).

    By default they come in a fixed order per question type (modality questions offer
    the four modalities of the answer's family), so the letter of an answer is always
    the same: the demo's tiny LM then learns the reference's letter-mapping chat from
    a few hundred examples. ``shuffle=True`` draws three other modalities at random and
    shuffles every list, as OmniMedVQA does; mapping an answer to its letter then means
    matching text across the prompt, which the 8B LLM does and the tiny LM does not
    learn within the demo's time.
    """
    right = f.answer(attribute)
    if attribute == "modality":
        if shuffle:
            others = [m.name for m in MODALITIES if m.name != right]
            pool = [right] + [str(x) for x in rng.choice(others, size=3, replace=False)]
        else:
            group = next(g for g in MODALITY_GROUPS if f.modality in g)
            pool = [MODALITIES[MODALITY_KEYS.index(k)].name for k in group]
    else:
        pool = list({"kind": KINDS, "location": LOCATIONS, "size": SIZES, "intensity": INTENSITIES}[attribute])
    if shuffle:
        pool = [pool[i] for i in rng.permutation(len(pool))]
    return [str(x) for x in pool]


# ---- images


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1))
    x = np.linspace(0, cells, size)
    i = np.minimum(x.astype(int), cells - 1)
    t = x - i
    rows = grid[i] * (1 - t)[:, None] + grid[i + 1] * t[:, None]  # [size, cells+1]
    return rows[:, i] * (1 - t)[None, :] + rows[:, i + 1] * t[None, :]  # [size, size]


def _background(key: str, rng: np.random.Generator, s: int) -> Tuple[np.ndarray, np.ndarray]:
    """The modality's look: an RGB float image in [0, 1] and the mask of the
    'tissue' where a finding may sit."""
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)  # [s, s] each, in [0, 1]
    noise = _smooth_noise(rng, s, 6)
    fine = rng.random((s, s))
    return _PAINTERS[key](_Canvas(yy, xx, noise, fine, rng))


@dataclass(frozen=True)
class _Canvas:
    """What every modality's painter starts from: the pixel grid and its noise."""

    yy: np.ndarray  # [s, s], rows in [0, 1]
    xx: np.ndarray  # [s, s], columns in [0, 1]
    noise: np.ndarray  # [s, s] low-frequency noise in [0, 1]
    fine: np.ndarray  # [s, s] per-pixel noise in [0, 1]
    rng: np.random.Generator

    @property
    def size(self) -> int:
        return self.yy.shape[0]

    def grey(self, g: np.ndarray) -> np.ndarray:
        return np.repeat(g[..., None], 3, -1)  # [s, s, 3]

    def everywhere(self) -> np.ndarray:
        return np.ones(self.yy.shape, bool)


def _ct(c: _Canvas):
    """A grey body ellipse with a bright rim (bone) on black."""
    r = ((c.xx - 0.5) / 0.48) ** 2 + ((c.yy - 0.5) / 0.44) ** 2
    g = np.where(r < 1, 0.45 + 0.1 * c.noise, 0.02)
    g = np.where((r > 0.82) & (r < 1), 0.85, g)
    return c.grey(g), r < 0.8


def _x_ray(c: _Canvas):
    """A vertical gradient with horizontal rib bands."""
    ribs = 0.12 * (np.sin(c.yy * 2 * math.pi * 5 + c.rng.random() * 6) > 0.6)
    g = 0.25 + 0.25 * np.abs(c.xx - 0.5) * 2 + ribs + 0.06 * c.noise
    return c.grey(g), c.everywhere()


def _mr(c: _Canvas):
    """A soft, evenly grey head with a darker ring of fluid."""
    r = ((c.xx - 0.5) / 0.46) ** 2 + ((c.yy - 0.5) / 0.48) ** 2
    g = np.where(r < 1, 0.5 + 0.15 * c.noise, 0.0)
    g = np.where((r > 0.75) & (r < 0.9), 0.25, g)
    return c.grey(g), r < 0.72


def _ultrasound(c: _Canvas):
    """A speckled fan on black."""
    ang = np.arctan2(c.xx - 0.5, c.yy + 0.3)
    rad = np.hypot(c.xx - 0.5, c.yy + 0.3)
    fan = (np.abs(ang) < 0.8) & (rad < 1.2)
    g = np.where(fan, 0.3 + 0.25 * c.fine * c.noise + 0.1 * c.noise, 0.0)
    return c.grey(g), fan


def _dermoscopy(c: _Canvas):
    """Skin tone with a vignette."""
    base = np.array([0.85, 0.62, 0.5])
    vign = 1 - 0.5 * (((c.xx - 0.5) ** 2 + (c.yy - 0.5) ** 2) * 2)
    return base[None, None] * (vign * (0.9 + 0.1 * c.noise))[..., None], c.everywhere()


def _fundus(c: _Canvas):
    """An orange disc with dark red vessels on black."""
    r = np.hypot(c.xx - 0.5, c.yy - 0.5)
    disc = r < 0.49
    img = np.zeros((c.size, c.size, 3))
    img[disc] = [0.8, 0.35, 0.1]
    phase = c.rng.random() * 6
    vessels = (np.abs(np.sin((c.xx * 3 + c.yy * 2) * 4 + phase)) < 0.12) & disc
    img[vessels] = [0.5, 0.1, 0.05]
    img *= (0.9 + 0.1 * c.noise)[..., None]
    return img, r < 0.46


def _oct(c: _Canvas):
    """Horizontal retinal layers, wavy."""
    wave = 0.06 * np.sin(c.xx * 2 * math.pi + c.rng.random() * 6)
    layers = np.sin((c.yy + wave) * 2 * math.pi * 4)
    g = 0.35 + 0.2 * layers + 0.08 * c.noise
    return np.stack([g * 0.8, g * 0.9, g], -1), c.everywhere()


def _microscopy(c: _Canvas):
    """Pink tissue with purple nuclei."""
    s = c.size
    img = np.empty((s, s, 3))
    img[:] = [0.9, 0.7, 0.82]
    img *= (0.92 + 0.08 * c.noise)[..., None]
    for _ in range(14):
        cy, cx = c.rng.random(2) * s
        m = (c.yy * (s - 1) - cy) ** 2 + (c.xx * (s - 1) - cx) ** 2 < (s / 32) ** 2
        img[m] = [0.55, 0.4, 0.7]
    return img, c.everywhere()


# modality key -> its painter, in the order of MODALITIES
_PAINTERS: Dict[str, Callable[[_Canvas], Tuple[np.ndarray, np.ndarray]]] = dict(
    zip(MODALITY_KEYS, (_ct, _x_ray, _mr, _ultrasound, _dermoscopy, _fundus, _oct, _microscopy))
)


def _lesion_mask(kind: str, cy: float, cx: float, radius: float, s: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(float)
    d = np.hypot(yy - cy, xx - cx)
    if kind == "nodule":  # a filled disc
        return d <= radius
    if kind == "cyst":  # a ring with a hollow centre
        return (d <= radius) & (d >= radius * 0.6)
    if kind == "mass":  # a filled, flat ellipse
        return ((yy - cy) / (radius * 0.5)) ** 2 + ((xx - cx) / (radius * 1.2)) ** 2 <= 1
    if kind == "calcification":  # a cluster of separate specks
        m = np.zeros((s, s), bool)
        for k in range(4):
            a = 2 * math.pi * k / 4 + math.pi / 4 + rng.normal(0, 0.15)
            py, px = cy + radius * 0.75 * math.sin(a), cx + radius * 0.75 * math.cos(a)
            m |= np.hypot(yy - py, xx - px) <= max(1.2, radius * 0.25)
        return m
    raise KeyError(kind)


def render(f: Finding, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw one image of finding ``f`` as uint8 ``[size, size, 3]``."""
    img, tissue = _background(f.modality, rng, size)
    radius = size * (RADIUS_SMALL if f.size == "small" else RADIUS_LARGE) * (0.95 + 0.1 * rng.random())
    vert, horiz = f.location.split()
    # the lesion centre: inside its quadrant, away from the image's middle lines
    lo, hi = LESION_OFFSET
    cy = size * (0.5 - (lo + (hi - lo) * rng.random()) * (1 if vert == "upper" else -1)) - 0.5
    cx = size * (0.5 - (lo + (hi - lo) * rng.random()) * (1 if horiz == "left" else -1)) - 0.5
    mask = _lesion_mask(f.kind, cy, cx, radius, size, rng)
    local = img[mask].mean(0) if mask.any() else img.mean((0, 1))
    if f.intensity == "bright":
        color = np.clip(local + 0.45, 0.75, 1.0)
    else:
        color = np.clip(local - 0.45, 0.0, 0.12)
    img = img.copy()
    img[mask] = color
    img += rng.normal(0, 0.025, img.shape)  # sensor noise, so no two images are alike
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# ---- held-out combinations

HELD_OUT_ATTRIBUTES: Tuple[str, ...] = ("modality", "kind", "location")
Triple = Tuple[str, str, str]  # (modality key, kind, location)


def held_out_combinations(seed: int = 0, per_modality: int = 2) -> Tuple[Triple, ...]:
    """The (modality, kind, location) triples vision training never sees.

    ``per_modality`` (0, 1 or 2) triples per modality, laid out so that no kind,
    location, (modality, kind), (modality, location) or (kind, location) pair goes
    missing from training: a modality's held-out triples differ in kind and in
    location, every (kind, location) pair is held out at most once, and every kind
    and location equally often. A held-out triple is thus a new *combination* of
    parts each seen many times. The seed permutes kinds, locations and modalities,
    so each seed holds out other triples.
    """
    if per_modality not in (0, 1, 2):
        raise ValueError(f"held_out_per_modality must be 0, 1 or 2, got {per_modality}")
    rng = np.random.default_rng([seed, 23])
    kinds = [KINDS[i] for i in rng.permutation(len(KINDS))]
    locs = [LOCATIONS[i] for i in rng.permutation(len(LOCATIONS))]
    mods = [MODALITY_KEYS[i] for i in rng.permutation(len(MODALITY_KEYS))]
    out: List[Triple] = []
    for m, key in enumerate(mods):
        a, b = m % 4, m // 4
        # j = 0: kind a, location a + 2b; j = 1: kind a + 2, location a + 2b + 3. Over the
        # 8 modalities the pairs (kind, location - kind) cover all 16 once, the
        # differences {0, 2} with j = 0 and {1, 3} with j = 1.
        for j in range(per_modality):
            k = (a + 2 * j) % 4
            out.append((key, kinds[k], locs[(k + 2 * b + j) % 4]))
    return tuple(sorted(out, key=lambda t: (MODALITY_KEYS.index(t[0]), t[1], t[2])))


# ---- splits


def sample_finding(rng: np.random.Generator, modalities: Sequence[str]) -> Finding:
    return Finding(
        modality=str(modalities[rng.integers(len(modalities))]),
        kind=str(KINDS[rng.integers(len(KINDS))]),
        location=str(LOCATIONS[rng.integers(len(LOCATIONS))]),
        size=str(SIZES[rng.integers(len(SIZES))]),
        intensity=str(INTENSITIES[rng.integers(len(INTENSITIES))]),
    )


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


def _draw(rng: np.random.Generator, modality: str, held_out: Collection[Triple], unseen: bool) -> Finding:
    """A finding of ``modality`` whose (modality, kind, location) is held out
    (``unseen``) or not, uniform over the allowed triples, size and intensity."""
    pairs = [(k, loc) for k in KINDS for loc in LOCATIONS if ((modality, k, loc) in held_out) == unseen]
    if not pairs:
        raise ValueError(f"no {'held-out' if unseen else 'seen'} combination of {modality!r} to draw")
    kind, loc = pairs[rng.integers(len(pairs))]
    size = str(SIZES[rng.integers(len(SIZES))])
    return Finding(modality, kind, loc, size, str(INTENSITIES[rng.integers(len(INTENSITIES))]))


def make_split(
    root: str | Path,
    split: str,
    n: int,
    *,
    image_dir: str = "images",
    seed: int = 0,
    image_size: int = 64,
    modalities: Sequence[str] = MODALITY_KEYS,
    held_out: Collection[Triple] = (),
    on_image: Optional[Callable[[], None]] = None,
) -> List[Dict]:
    """Draw ``n`` images of ``split`` ("train" or "test") into ``root/image_dir/``.

    Modalities are balanced (image ``i`` has modality ``i % len(modalities)``). The
    ``held_out`` triples never occur in "train"; in "test", when there are any, every
    other run of ``len(modalities)`` images shows them (image ``i`` is unseen when
    ``(i // len(modalities)) % 2 == 1``), the rest shows seen ones.
    ``on_image`` is called after each image (progress).
    Returns one record per image: ``image`` (path relative to ``root``), ``caption``,
    the finding's attributes and ``combination`` ("seen" or "unseen").
    """
    from PIL import Image

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    bad = [m for m in modalities if m not in MODALITY_KEYS]
    if bad:
        raise ValueError(f"unknown modalities {bad}; choose from {list(MODALITY_KEYS)}")
    held = frozenset(held_out)
    out = Path(root)
    img_dir = out / image_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = _image_rng(seed, split, i)
        unseen = bool(held) and split == "test" and (i // len(modalities)) % 2 == 1
        f = _draw(rng, modalities[i % len(modalities)], held, unseen)
        rel = f"{image_dir}/{split}_{i:05d}.png"
        Image.fromarray(render(f, rng, image_size), "RGB").save(out / rel)
        records.append({"image": rel, "caption": caption(f), **asdict(f),
                        "combination": "unseen" if unseen else "seen"})
        if on_image is not None:
            on_image()
    return records


def sharegpt_records(records: Sequence[Dict], image_dir: str, num_placeholders: int) -> List[Dict]:
    """Caption samples in the reference's sharegpt layout (placeholders only in the human turn).

    ``image_dir`` is the images' folder relative to the JSON file's own folder and goes
    into ``meta`` as a relative ``dir=``: medcap's reader then finds the images beside
    the JSON wherever the folder is moved (an absolute ``dir=`` would pin it to one place).
    """
    if Path(image_dir).is_absolute():
        raise ValueError(f"image_dir must be relative to the JSON file's folder, got {image_dir!r}")
    return [
        {
            "conversations": [
                {"from": "human", "value": PLACEHOLDER_CHAR * num_placeholders},
                {"from": "gpt", "value": r["caption"]},
            ],
            "image": r["image"],
            "meta": f"dir={Path(image_dir).as_posix()}",
        }
        for r in records
    ]


def omnimedvqa_questions(
    records: Sequence[Dict], *, seed: int = 0, per_image: int = 2, image_prefix: str = "", shuffle_options: bool = False
) -> List[Dict]:
    """Multiple-choice questions in OmniMedVQA's JSON layout, ``per_image`` per image,
    each about a different attribute. ``image_prefix`` is prepended to the image path
    (paths are relative to the ``OmniMedVQA/`` folder)."""
    out = []
    for i, r in enumerate(records):
        rng = np.random.default_rng([seed, 7, i])
        f = Finding(r["modality"], r["kind"], r["location"], r["size"], r["intensity"])
        for qi in rng.choice(len(QUESTION_TYPES), size=min(per_image, len(QUESTION_TYPES)), replace=False):
            qtype, attribute, question = QUESTION_TYPES[qi]
            opts = options_for(attribute, f, rng, shuffle=shuffle_options)
            q = {
                "question_id": f"{DATASET_NAME}_{i:05d}_{attribute}",
                "dataset": DATASET_NAME,
                "question_type": qtype,
                "question": question,
                "gt_answer": f.answer(attribute),
                "image_path": image_prefix + r["image"],
            }
            for letter, opt in zip("ABCD", opts):
                q[f"option_{letter}"] = opt
            q["modality_type"] = f.modality
            out.append(q)
    return out


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (a half-written file never looks finished)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_world(out_dir: str | Path, settings) -> Dict[str, str]:
    """Write the demo's world under ``out_dir`` (``settings``: a ``DemoSettings``):

    * ``train.json``: sharegpt captions of the training images (``images/train/``);
    * ``OmniMedVQA/Images/MedcapDemo/``: the held-out test images, which serve both
      ``test.json`` (sharegpt captions, for ``test_metrics``) and
      ``OmniMedVQA/QA_information/Open-access/MedcapDemo.json`` (questions, for
      ``test_omnimedvqa`` with ``dataset_source`` = ``out_dir``);
    * ``world.json``: the attributes of every image (and whether its combination was
      held out from training), and the held-out triples, for the report.

    The training split never shows a held-out (modality, kind, location) triple
    (``held_out_combinations`` with ``settings.held_out_per_modality``); the test
    split shows them in half of its images. Every path in these files is relative to the file's folder, so ``out_dir`` can be moved.
    """
    out = Path(out_dir)
    n_ph = settings.num_image_tokens
    from medcap._io import progress

    held = held_out_combinations(settings.seed, settings.held_out_per_modality)
    bar = progress(settings.n_train + settings.n_test, "world: drawing images", "img")
    common = dict(seed=settings.seed, image_size=settings.image_size, held_out=held, on_image=lambda: bar.update(1))
    train = make_split(out, "train", settings.n_train, image_dir="images/train", **common)
    omni = out / "OmniMedVQA"
    test = make_split(omni, "test", settings.n_test, image_dir=f"Images/{DATASET_NAME}", **common)
    bar.close()
    paths = {
        "train": write_json(out / "train.json", sharegpt_records(train, ".", n_ph)),
        "test": write_json(out / "test.json", sharegpt_records(test, omni.name, n_ph)),
        "questions": write_json(
            omni / "QA_information" / "Open-access" / f"{DATASET_NAME}.json",
            omnimedvqa_questions(test, seed=settings.seed, per_image=settings.questions_per_image,
                                 shuffle_options=bool(settings.shuffle_options)),
        ),
        "world": write_json(out / "world.json", {"held_out_attributes": list(HELD_OUT_ATTRIBUTES),
                                                 "held_out": [list(t) for t in held], "train": train, "test": test}),
    }
    return {k: str(v) for k, v in paths.items()}
