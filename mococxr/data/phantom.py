"""Procedural chest radiographs: the embedded dataset for the demo and the tests.

Real CXR data cannot ship with the package, so the phantom writes a small dataset in the on-disk
layout of a real one (CheXpert-v1.0-small, or the Shenzhen TB set) and the ordinary readers load it.
The images are drawn the way the findings look on film so that the labels are learnable but not
trivial: a small pleural effusion only blunts a costophrenic angle, cardiomegaly is a heart wider than
about half the chest, and every patient varies in habitus, pose, exposure, noise and projection (AP
films magnify the heart and add the scapulae). That nuisance variation is what a self-supervised
encoder can learn from unlabeled images and a from-scratch model must learn from the few labels.

Findings are drawn independently of the view, sex and age, so a model cannot reach a good AUC from a
projection shortcut. Everything random is seeded from ``(seed, split, patient, study, view)``: the
output is byte-identical for a seed whatever the number of workers, and the first patients stay the
same when ``n`` grows.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# The header the CheXpert reader requires is the one written: the phantom's CSVs read like the real ones.
from mococxr.data.readers import CHEXPERT_HEADER, CHEXPERT_OBSERVATIONS
from mococxr.data.workers import die_with_parent
from mococxr.errors import DataError

CHEXPERT_DIR = "CheXpert-v1.0-small"
MARKER = ".mococxr-phantom"  # in every folder the phantom writes: it owns that folder (see synthesize)
LAYOUTS = ("chexpert", "shenzhen")

# Prevalences and label-noise rates of the CheXpert layout (per study unless said otherwise).
P_EFFUSION = 0.35
P_CARDIOMEGALY = 0.20  # per patient: a chronic finding persists across studies
P_AP = 0.60
P_LATERAL = 0.20
P_DEVICE = 0.25
STUDIES_PER_PATIENT = ([1, 2, 3], [0.80, 0.14, 0.06])
_TRAIN, _VALID, _SHENZHEN = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Public API


def synthesize(
    out: str | os.PathLike,
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    layout: str = "chexpert",
    workers: int | None = None,
    n_valid: int | None = None,
) -> Path:
    """Write a phantom dataset of ``n`` images under ``out`` and return ``out``.

    ``layout="chexpert"`` writes ``CheXpert-v1.0-small/{train,valid}.csv`` and the JPEG tree exactly as
    the real CheXpert-v1.0-small download (header, ``Male``/``Female``, ``1.0``/``0.0``/``-1.0``/blank
    labels, ``patientNNNNN/studyN/viewN_frontal.jpg``). ``n`` is the number of rows in ``train.csv``;
    ``valid.csv`` gets ``n_valid`` (default ``max(20, n // 10)``) more images from separate patients,
    fully labeled with 0/1 and no uncertain labels, as the real validation set that serves as a test set.
    ``layout="shenzhen"`` writes ``CXR_png/CHNCXR_0001_0.png`` ... (the digit before the extension is
    the TB label), one frontal PA image per patient, half of them with upper-zone TB opacities.

    ``workers`` processes render the images (default ``min(2, cpu count)``); the output does not depend
    on it. The phantom is written only into a folder it owns: ``out`` must be new, empty, or a phantom
    written before (its :data:`MARKER` file); any other folder is refused before anything is written, so
    pointing this at a real dataset never changes a byte of it. The marker is written first (so an
    interrupted write is still recognisably the phantom's) and holds the parameters once every file is
    written (:func:`is_phantom_of` then lets a caller reuse the folder). In an owned folder, the phantom's
    files are overwritten and other files are left alone.
    """
    if layout not in LAYOUTS:
        raise DataError(f"phantom layout {layout!r} is unknown; expected one of {', '.join(LAYOUTS)}")
    if not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"phantom n={n!r} is invalid; expected a positive number of images")
    if not isinstance(size, int | np.integer) or size < 32:
        raise DataError(f"phantom size={size!r} is invalid; expected an image side of at least 32 pixels")
    out = Path(out)
    n_test = _n_valid(layout, n, n_valid)
    check_target(out)  # before anything is written
    marker = out / MARKER
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(marker, "writing (interrupted if this line stays)\n")
    if layout == "chexpert":
        train = _plan_chexpert(int(n), seed, _TRAIN, first_patient=1)
        first_valid = int(train[-1]["patient"]) + 1
        valid = _plan_chexpert(n_test, seed, _VALID, first_patient=first_valid)
        specs = train + valid
        root = out / CHEXPERT_DIR
        _write_csv(root / "train.csv", (s["row"] for s in train))
        _write_csv(root / "valid.csv", (s["row"] for s in valid))
    else:
        specs = _plan_shenzhen(int(n), seed)
    for spec in specs:
        spec["file"] = str(out / spec["relpath"])
        spec["size"] = int(size)
    _render_all(specs, workers)
    _write_atomic(marker, marker_text(n, size=size, seed=seed, layout=layout, n_valid=n_valid) + "\n")
    return out


def _n_valid(layout: str, n: int, n_valid: int | None) -> int | None:
    """The CheXpert layout's valid.csv rows (``None`` for Shenzhen), checked."""
    if layout != "chexpert":
        return None
    n_test = max(20, int(n) // 10) if n_valid is None else int(n_valid)
    if n_test < 2:
        raise DataError(f"phantom n_valid={n_valid!r} is invalid; expected at least 2 images")
    return n_test


def marker_text(n: int, *, size: int, seed: int, layout: str = "chexpert", n_valid: int | None = None) -> str:
    """What a complete phantom's :data:`MARKER` holds: every parameter that decides its files."""
    return (
        f"layout={layout} n={int(n)} n_valid={_n_valid(layout, n, n_valid)} size={int(size)} seed={int(seed)}"
    )


def is_phantom(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a folder the phantom generator made (it holds :data:`MARKER`)."""
    return (Path(root) / MARKER).is_file()


def is_phantom_of(
    root: str | os.PathLike,
    n: int,
    *,
    size: int,
    seed: int,
    layout: str = "chexpert",
    n_valid: int | None = None,
) -> bool:
    """Whether ``root`` holds a complete phantom written with exactly these parameters (reuse it)."""
    marker = Path(root) / MARKER
    try:
        return marker.read_text().strip() == marker_text(
            n, size=size, seed=seed, layout=layout, n_valid=n_valid
        )
    except OSError:
        return False


def check_target(out: str | os.PathLike) -> None:
    """Raise ``DataError`` unless ``out`` may receive a phantom: a new or empty folder, or a phantom's.

    Nothing is written here; callers that write several folders check them all first.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"phantom --out {out} is a file, not a folder; name a folder (it is created)")
    if out.is_dir() and not is_phantom(out) and any(out.iterdir()):
        raise DataError(
            f"phantom data root {out} already holds files that mococxr did not write (no {MARKER} marker): "
            "the phantom is written only into a new or empty folder or one it made before, never into a "
            "dataset; name another folder"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_example(path: str | os.PathLike, *, size: int = 256, seed: int = 3) -> Path:
    """Write one PA frontal phantom with a right pleural effusion to ``path`` (PNG), e.g. for a README."""
    rng = np.random.default_rng([seed, 99])
    anatomy = _sample_anatomy(rng, cardiomegaly=False)
    study = _sample_study(np.random.default_rng([seed, 99, 1]), view="PA")
    study["effusion"] = {"right": 0.45}
    study["device"] = ""
    img = _render_frontal(anatomy, study, size, np.random.default_rng([seed, 99, 2]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "L").save(path, optimize=True)
    return path


# ----------------------------------------------------------------------------------------------------
# Planning: every random draw that decides labels and anatomy, done in one process


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _sample_anatomy(rng: np.random.Generator, *, cardiomegaly: bool) -> dict:
    """Body habitus shared by all studies of a patient (normalized image coordinates, y downwards)."""
    y_apex = rng.uniform(0.09, 0.16)
    return {
        "cx": 0.5 + rng.normal(0.0, 0.012),
        "tw": rng.uniform(0.33, 0.41),  # inner thoracic half-width at the costophrenic angles
        "y_apex": y_apex,
        "y_cp": rng.uniform(0.74, 0.85),  # costophrenic angle level
        "dome": rng.uniform(0.08, 0.13),  # dome height above the angles
        "dome_r": rng.uniform(0.0, 0.035),  # the right hemidiaphragm sits higher
        "mw": rng.uniform(0.05, 0.075),  # upper mediastinum half-width
        "body": rng.uniform(1.10, 1.30),  # body half-width / thoracic half-width
        "ctr": rng.uniform(0.55, 0.70) if cardiomegaly else rng.uniform(0.38, 0.50),
        "heart_h": rng.uniform(0.85, 1.1),
        "heart_tilt": rng.uniform(25.0, 45.0),
        "n_ribs": rng.uniform(9.0, 10.5),
        "rib_curve": rng.uniform(0.9, 1.6),
        "air": rng.uniform(0.78, 0.92),
        "bone": rng.uniform(0.8, 1.2),
        "breast": 0.0,
        "texture": int(rng.integers(2**31)),
    }


def _sample_study(rng: np.random.Generator, *, view: str) -> dict:
    """Pose, exposure and projection of one study (a patient's anatomy is sampled once)."""
    ap = view == "AP"
    return {
        "view": view,
        "angle": rng.uniform(-5.0, 5.0),
        "scale": rng.uniform(0.95, 1.05),
        "dx": rng.normal(0.0, 0.015),
        "dy": rng.normal(0.0, 0.015),
        "inspiration": rng.uniform(-0.06, -0.02) if ap else rng.uniform(-0.015, 0.02),
        "k": rng.uniform(1.2, 1.9),
        "lo": rng.uniform(0.0, 0.08),
        "hi": rng.uniform(0.9, 1.05),
        "gamma": rng.uniform(0.8, 1.25),
        "tilt": rng.normal(0.0, 0.05),
        "noise": rng.uniform(0.008, 0.025),
        "blur": rng.uniform(0.3, 0.7) + (0.4 if ap else 0.0),
        "marker": str(rng.choice(["", "", "R", "L", "AP" if ap else "PA", "PORTABLE" if ap else "ERECT"])),
        "corner": int(rng.integers(4)),
        "device": str(rng.choice(["ecg", "line", "tube"])) if rng.random() < P_DEVICE else "",
        "effusion": {},
    }


def _sample_effusion(rng: np.random.Generator) -> dict:
    """Side(s) and severity in (0, 1]; most effusions are small, the smallest only blunt an angle."""
    if rng.random() >= P_EFFUSION:
        return {}
    sev = float(np.clip(rng.beta(1.4, 2.2), 0.04, 1.0))
    side = rng.choice(["right", "left", "both"], p=[0.35, 0.30, 0.35])
    if side == "both":
        return {"right": sev, "left": float(max(0.04, sev * rng.uniform(0.4, 1.0)))}
    return {str(side): sev}


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _labels(rng: np.random.Generator, anatomy: dict, study: dict, *, valid: bool) -> dict:
    """Report-style labels: uncertain mostly on borderline findings, blanks for "not mentioned"."""
    eff_pos = bool(study["effusion"])
    eff_max = max(study["effusion"].values(), default=0.0)
    card_pos = anatomy["ctr"] >= 0.55
    device = bool(study["device"])
    labels: dict[str, float | None] = {}
    if valid:
        for obs in CHEXPERT_OBSERVATIONS:
            labels[obs] = 0.0
        labels["Pleural Effusion"] = float(eff_pos)
        labels["Cardiomegaly"] = float(card_pos)
        labels["Enlarged Cardiomediastinum"] = float(card_pos and rng.random() < 0.5)
        labels["Support Devices"] = float(device)
        labels["No Finding"] = float(not (eff_pos or card_pos))
        return labels

    def report(positive: bool, p_unc: float, p_blank: float) -> float | None:
        if rng.random() < p_unc:
            return -1.0
        if positive:
            return 1.0
        return None if rng.random() < p_blank else 0.0

    labels["Pleural Effusion"] = report(eff_pos, (0.18 if eff_max < 0.2 else 0.03) if eff_pos else 0.03, 0.5)
    card_unc = (
        (0.25 if anatomy["ctr"] < 0.58 else 0.03) if card_pos else (0.08 if anatomy["ctr"] > 0.47 else 0.01)
    )
    labels["Cardiomegaly"] = report(card_pos, card_unc, 0.7)
    for obs in CHEXPERT_OBSERVATIONS:
        if obs in labels or obs in ("No Finding", "Support Devices"):
            continue
        u = rng.random()
        labels[obs] = 0.0 if u < 0.08 else (1.0 if u < 0.095 else None)
    if card_pos and rng.random() < 0.4:
        labels["Enlarged Cardiomediastinum"] = 1.0
    u = rng.random()
    labels["Support Devices"] = 1.0 if device else (0.0 if u < 0.1 else None)
    pathology = [labels[o] for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices")]
    labels["No Finding"] = 1.0 if all(v is None or v == 0.0 for v in pathology) else None
    return labels


def _plan_chexpert(n: int, seed: int, split: int, *, first_patient: int) -> list[dict]:
    """Patients, studies and views until ``n`` images, each with its labels and drawing parameters."""
    specs: list[dict] = []
    folder = "train" if split == _TRAIN else "valid"
    p = 0
    while len(specs) < n:
        prng = _rng(seed, split, p)
        card = bool(prng.random() < P_CARDIOMEGALY)
        anatomy = _sample_anatomy(prng, cardiomegaly=card)
        sex = "Female" if prng.random() < 0.5 else "Male"
        if sex == "Female":
            anatomy["breast"] = float(prng.uniform(0.05, 0.2))
        age = int(prng.integers(18, 91))
        n_studies = int(prng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))
        patient = f"patient{first_patient + p:05d}"
        for s in range(n_studies):
            srng = _rng(seed, split, p, s + 1)
            view = "AP" if srng.random() < P_AP else "PA"
            study = _sample_study(srng, view=view)
            study["effusion"] = _sample_effusion(srng)
            lateral = bool(srng.random() < P_LATERAL)
            labels = _labels(srng, anatomy, study, valid=split == _VALID)
            views = [("frontal", view)] + ([("lateral", "")] if lateral else [])
            for v, (kind, appa) in enumerate(views, start=1):
                rel = f"{CHEXPERT_DIR}/{folder}/{patient}/study{s + 1}/view{v}_{kind}.jpg"
                row = [rel, sex, str(min(90, age + s)), kind.capitalize(), appa]
                row += [_fmt(labels[o]) for o in CHEXPERT_OBSERVATIONS]
                specs.append(
                    {
                        "relpath": rel,
                        "row": row,
                        "patient": first_patient + p,
                        "kind": kind,
                        "anatomy": anatomy,
                        "study": study,
                        "noise_key": [seed, split, p, s + 1, v],
                    }
                )
                if len(specs) == n:
                    return specs
        p += 1
    return specs


def _plan_shenzhen(n: int, seed: int) -> list[dict]:
    """One PA image per patient; exactly ``round(n / 2)`` are TB positive, in a seeded order."""
    order = _rng(seed, _SHENZHEN).permutation(n)
    tb = np.zeros(n, dtype=bool)
    tb[order[: int(round(n / 2))]] = True
    specs = []
    for i in range(n):
        prng = _rng(seed, _SHENZHEN, i + 1)
        anatomy = _sample_anatomy(prng, cardiomegaly=bool(prng.random() < 0.05))
        study = _sample_study(prng, view="PA")
        study["device"] = ""
        study["marker"] = ""
        if tb[i]:
            study["tb"] = _sample_tb(prng)
            if prng.random() < 0.1:
                study["effusion"] = {str(prng.choice(["right", "left"])): float(prng.uniform(0.05, 0.3))}
        specs.append(
            {
                "relpath": f"CXR_png/CHNCXR_{i + 1:04d}_{int(tb[i])}.png",
                "kind": "frontal",
                "anatomy": anatomy,
                "study": study,
                "noise_key": [seed, _SHENZHEN, i + 1, 0],
            }
        )
    return specs


def _sample_tb(rng: np.random.Generator) -> list[tuple]:
    """Upper-zone lesions as (side, x in [0,1] across the lung, y in [0,1] down the upper zone, radius,
    density, cavity): clustered nodules, patchy consolidation, sometimes a cavity."""
    sides = ["right", "left"] if rng.random() < 0.4 else [str(rng.choice(["right", "left"]))]
    lesions = []
    for side in sides:
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.6)
        lesions.append((side, cx, cy, rng.uniform(0.06, 0.11), rng.uniform(0.55, 0.85), False))
        for _ in range(int(rng.integers(4, 12))):
            lesions.append(
                (
                    side,
                    float(np.clip(cx + rng.normal(0, 0.18), 0.05, 0.95)),
                    float(np.clip(cy + rng.normal(0, 0.2), 0.0, 0.95)),
                    rng.uniform(0.012, 0.03),
                    rng.uniform(0.5, 0.9),
                    False,
                )
            )
        if rng.random() < 0.35:
            lesions.append((side, cx, cy, rng.uniform(0.02, 0.035), 0.7, True))
    return lesions


def _write_csv(path: Path, rows: Iterable[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CHEXPERT_HEADER)
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------
# Rendering


def _render_all(specs: list[dict], workers: int | None) -> None:
    """Render and save every spec; a process pool when it pays for its start-up."""
    for d in {str(Path(s["file"]).parent) for s in specs}:
        Path(d).mkdir(parents=True, exist_ok=True)
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    _raise_malloc_thresholds()
    if workers <= 1 or len(specs) < 64:
        for spec in specs:
            _render_one(spec)
        return
    chunk = max(1, min(64, len(specs) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        for _ in pool.map(_render_one, specs, chunksize=chunk):
            pass


def _init_worker(parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a SIGKILLed command leaves no renderer behind
    _raise_malloc_thresholds()


def _raise_malloc_thresholds() -> None:
    """Free one 16 MB block so that glibc raises its mmap and trim thresholds (its own dynamic rule).

    Rendering makes and frees many 64 KB temporaries per image; with the start-up thresholds glibc
    hands the freed heap top back to the OS and page-faults it in again for the next image, which
    measured 2x slower. Elsewhere (other allocators) this is a harmless allocation.
    """
    block = np.ones(16 << 20, dtype=np.uint8)
    del block


def _render_one(spec: dict) -> None:
    rng = _rng(*spec["noise_key"])
    if spec["kind"] == "lateral":
        img = _render_lateral(spec["anatomy"], spec["study"], spec["size"], rng)
    else:
        img = _render_frontal(spec["anatomy"], spec["study"], spec["size"], rng)
    im = Image.fromarray(img, "L")
    if spec["file"].endswith(".png"):
        im.save(spec["file"], compress_level=1)
    else:
        im.save(spec["file"], quality=90)


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 (d < -width/2) to 1 (d > width/2): a cheap anti-aliased edge."""
    out = d * np.float32(1.0 / width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _grid(size: int, study: dict, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """Body-space coordinates of a strip of pixel rows: the patient's pose (rotation, scale, shift)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    a = math.radians(study["angle"])
    cos, sin = math.cos(a) / study["scale"], math.sin(a) / study["scale"]
    x0, y0 = c[None, :], c[rows, None]
    x = cos * x0 + sin * y0 + np.float32(0.5 - study["dx"])
    y = -sin * x0 + cos * y0 + np.float32(0.5 - study["dy"])
    return x.astype(np.float32), y.astype(np.float32)


def _render_strips(pixels, an: dict, st: dict, size: int, tex: np.ndarray) -> np.ndarray:
    """Evaluate a pointwise renderer strip by strip, so that its temporaries stay in the CPU cache."""
    img = np.empty((size, size), dtype=np.float32)
    step = max(8, 32768 // size)
    for r0 in range(0, size, step):
        rows = slice(r0, min(size, r0 + step))
        x, y = _grid(size, st, rows)
        img[rows] = pixels(an, st, x, y, tex[rows])
    return img


def _finish(img: np.ndarray, an: dict, st: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Film to uint8, burned-in overlays, unsharpness, quantum noise."""
    im = Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8), "L")
    _draw_overlays(im, st, size, an, rng)
    im = im.filter(ImageFilter.GaussianBlur(st["blur"] * size / 256))
    return _add_noise(np.asarray(im, dtype=np.float32), st["noise"], rng)


def _lowfreq(seed: int, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: bicubic upsampling of a few random cells."""
    field = np.random.default_rng(seed).standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(field, "F").resize((size, size), Image.BICUBIC))


def _render_frontal(an: dict, st: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """A frontal (PA or AP) radiograph as uint8: attenuation map -> exposure -> blur and noise."""
    st = dict(st, spokes=_spokes(an["texture"]))
    img = _render_strips(_frontal_pixels, an, st, size, _lowfreq(an["texture"], size, 36))
    return _finish(img, an, st, size, rng)


def _frontal_pixels(an: dict, st: dict, x: np.ndarray, y: np.ndarray, tex: np.ndarray) -> np.ndarray:
    """Film density in [0, 1] at body-space points (x, y): anatomy, findings, exposure."""
    ap = st["view"] == "AP"
    cx, tw, mw, y_apex = an["cx"], an["tw"], an["mw"], an["y_apex"]
    y_cp = an["y_cp"] + st["inspiration"]
    xr = x - np.float32(cx)
    xs = np.abs(xr)
    left = xr > 0  # image right is the patient's left

    # Body outline: neck widening into the shoulders; thickness profile of an elliptic cylinder.
    half = tw * an["body"]
    shoulder = _ramp(y - np.float32(y_apex + 0.02), 0.16)
    bw = np.float32(0.12) + np.float32(half - 0.12) * shoulder
    t = 1.0 - (xr / bw) ** 2
    thick = np.sqrt(np.clip(t, 0.0, 1.0)) * _ramp(t, 0.08)

    # Lungs: rounded apices, a bell-shaped rib cage widening downwards, cut below by the domes.
    height = y_cp - y_apex
    tt = np.clip((y - np.float32(y_apex)) / np.float32(height), 0.0, 1.0)
    lat = np.float32(tw) * (0.74 + 0.26 * np.sqrt(tt))
    xl, aw = (lat + np.float32(mw)) * 0.5, (lat - np.float32(mw)) * 0.5
    ah = np.float32(height * 0.4)
    p = (xs - xl) / aw
    q = np.minimum((y - np.float32(y_apex) - ah) / ah, 0.0)
    shape = _ramp(1.0 - p * p - q * q, 0.25)
    y_side = np.where(left, np.float32(y_cp), np.float32(y_cp - an["dome_r"]))
    xdome = (mw + tw) / 2 - 0.05 * (tw - mw) / 2
    u = np.maximum((xs - np.float32(xdome)) / np.float32(tw - xdome), -0.5)
    y_dia = y_side - np.float32(an["dome"]) * (1.0 - u * u)
    below = _ramp(y - y_dia, 0.012)
    lung = shape * (1.0 - below)

    # Heart: a tilted ellipse, a third right and two thirds left of the midline, sunk into the left
    # dome; CTR = heart width / thoracic width, and an AP film magnifies it. Then the aortic knob.
    hw = an["ctr"] * tw * (1.12 if ap else 1.0)
    tilt = math.radians(an["heart_tilt"])
    ha = hw / math.sqrt(math.cos(tilt) ** 2 + (0.72 * math.sin(tilt)) ** 2)
    hb = 0.72 * ha * an["heart_h"]
    hv = math.sqrt((ha * math.sin(tilt)) ** 2 + (hb * math.cos(tilt)) ** 2)
    hx, hy = cx + 0.3 * hw, y_cp - an["dome"] - 0.25 * hv
    dx, dy = x - np.float32(hx), y - np.float32(hy)
    hu = (dx * np.float32(math.cos(tilt)) + dy * np.float32(math.sin(tilt))) / np.float32(ha)
    hv_ = (dy * np.float32(math.cos(tilt)) - dx * np.float32(math.sin(tilt))) / np.float32(hb)
    heart = _ramp(1.0 - hu * hu - hv_ * hv_, 0.12)
    kx, ky = cx + mw + 0.005, y_apex + 0.17
    knob = _ramp(1.0 - ((x - np.float32(kx)) ** 2 + (y - np.float32(ky)) ** 2) / np.float32(0.04**2), 0.3)
    trachea = _ramp(np.float32(0.016) - np.abs(xr + np.float32(0.004)), 0.008)
    trachea *= _ramp(np.float32(y_apex + 0.27) - y, 0.03)
    air = np.maximum(lung * (1.0 - heart) * (1.0 - knob), 0.45 * trachea)

    # Lung markings: vessels radiating from the hila and tapering outwards, a fine parenchymal mottle.
    hy_ = np.float32(y_apex + 0.42 * height)
    rad = np.sqrt((xs - np.float32(mw + 0.03)) ** 2 + (y - hy_) ** 2)
    ang = np.arctan2(y - hy_, xs - np.float32(mw + 0.03))
    spokes = st["spokes"]  # one more entry than bins: the angle pi maps to the last
    vessels = spokes[
        ((ang + np.float32(np.pi)) * np.float32((len(spokes) - 1) / (2 * np.pi))).astype(np.intp)
    ]
    fade = np.exp(-rad * np.float32(8.0))
    hil = np.exp(-(rad * rad) * np.float32(220.0))
    air *= 1.0 - 0.45 * hil - fade * (0.3 * vessels) - 0.06 * tex

    # Pleural effusion: fluid fills the costophrenic recess and rises laterally in a meniscus.
    for side, sev in st["effusion"].items():
        on = left if side == "left" else ~left
        lvl = y_cp - (0.0 if side == "left" else an["dome_r"]) - (0.02 + 0.7 * sev) * height
        men = 0.06 + 0.12 * sev
        w = np.clip((xs - np.float32(mw)) / np.float32(tw - mw), 0.0, 1.0)
        fluid = _ramp(y - (np.float32(lvl) - np.float32(men) * w * w), 0.02 + 0.04 * sev)
        if ap:  # supine fluid layers posteriorly: a haze over the hemithorax instead of a sharp meniscus
            fluid = 0.75 * fluid + 0.35 * sev * _ramp(y - np.float32(y_apex + 0.15), 0.5)
        air *= 1.0 - 0.92 * np.where(on, np.minimum(fluid, 1.0), 0.0)
    for side, lx, ly, r, dens, cavity in st.get("tb", ()):
        _add_lesion(air, x, y, cx, tw, mw, y_apex, height, side, lx, ly, r, dens, cavity)
    air *= np.float32(an["air"])

    # Bones: posterior ribs (arches), fainter anterior ribs, clavicles, spine, scapulae.
    cage = _ramp(lat + np.float32(0.03) - xs, 0.03) * _ramp(y - np.float32(y_apex - 0.05), 0.04)
    cage *= _ramp(np.float32(y_cp + 0.04) - y, 0.06)
    ph = y - np.float32(an["rib_curve"]) * (xs - np.float32(0.12)) ** 2 - np.float32(y_apex - 0.06)
    ph = np.clip(ph / np.float32(height + 0.1), 0.0, 1.3) ** 0.8 * np.float32(an["n_ribs"])
    ribs = np.clip((np.cos(np.float32(2 * np.pi) * ph) - 0.15) * 1.8, 0.0, 1.0)
    pa = (y + np.float32(0.55) * (xs - np.float32(tw)) - np.float32(y_apex - 0.02)) / np.float32(height)
    ribs_a = np.clip(np.cos(np.float32(2 * np.pi * 5.5) * np.clip(pa, 0.0, 1.2)) - 0.4, 0.0, 1.0)
    ribs_a *= _ramp(xs - np.float32(mw + 0.08), 0.1)
    bone = (0.1 * ribs + 0.05 * ribs_a) * cage
    y_cl = y_apex + (0.02 if ap else 0.09)
    yc = np.float32(y_cl) - 0.12 * (xs - 0.04) + 0.35 * (xs - 0.18) ** 2
    clav = _ramp(np.float32(0.014) - np.abs(y - yc), 0.01) * _ramp(xs - 0.035, 0.02)
    clav *= _ramp(np.float32(tw * 0.95) - xs, 0.05)
    bone += 0.3 * clav
    spine = _ramp(np.float32(0.042) - xs, 0.012) * (0.8 + 0.2 * np.cos(np.float32(2 * np.pi / 0.055) * y))
    bone += 0.18 * spine
    sx = tw - (0.13 if ap else 0.02)
    scap = _ramp(xs - (np.float32(sx) + 0.25 * (y - np.float32(y_apex))), 0.03)
    scap *= _ramp(y - np.float32(y_apex), 0.04) * _ramp(np.float32(y_apex + 0.32) - y, 0.1)
    scap *= _ramp(np.float32(tw + 0.07) - xs, 0.04)
    bone += 0.12 * scap
    hd = (xs - np.float32(half - 0.02)) ** 2 + (y - np.float32(y_apex + 0.01)) ** 2
    bone += 0.35 * _ramp(1.0 - hd / np.float32(0.065**2), 0.3)
    bone *= np.float32(an["bone"])

    # Soft tissue: thicker abdomen below the domes, breast shadows over the lower lung fields.
    abdomen = _ramp(y - y_dia, 0.03) * _ramp(np.float32(tw + 0.06) - xs, 0.1)
    atten = thick * (0.9 + 0.25 * abdomen - 0.85 * air) + bone * np.sqrt(thick)
    if an["breast"] > 0:
        bx = xs - np.float32(tw * 0.6)
        by = y - np.float32(y_cp - 0.08)
        atten += an["breast"] * _ramp(1.0 - (bx / 0.22) ** 2 - (by / 0.14) ** 2, 0.3) * (y > y_cp - 0.2)

    # Exposure: film response, window, gamma, heel-effect tilt, then blur and quantum noise.
    img = (1.0 - np.exp(-np.float32(st["k"]) * atten)) / np.float32(1.0 - math.exp(-st["k"] * 1.5))
    img = np.clip((img - np.float32(st["lo"])) / np.float32(st["hi"] - st["lo"]), 0.0, 1.0)
    return img ** np.float32(st["gamma"]) * (1.0 + np.float32(st["tilt"]) * (y - 0.5))


def _add_lesion(air, x, y, cx, tw, mw, y_apex, height, side, lx, ly, r, dens, cavity) -> None:
    """Add one TB lesion (nodule, patch or cavity) to the air map in place."""
    sgn = 1.0 if side == "left" else -1.0
    px = cx + sgn * (mw + lx * (tw - mw))
    py = y_apex + 0.03 + ly * 0.35 * height
    d2 = (x - np.float32(px)) ** 2 + (y - np.float32(py)) ** 2
    rr = np.float32(r * r)
    if cavity:
        ring = np.exp(-((np.sqrt(d2) - np.float32(r)) ** 2) / np.float32((0.3 * r) ** 2))
        blob = ring - 0.5 * np.exp(-d2 / rr)
    else:
        blob = np.exp(-d2 / rr)
    np.multiply(air, 1.0 - np.clip(dens * blob, 0.0, 0.95), out=air)


def _render_lateral(an: dict, st: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """A left lateral view: anterior to the image left, spine posterior, both lungs superimposed."""
    img = _render_strips(_lateral_pixels, an, st, size, _lowfreq(an["texture"], size, 24))
    return _finish(img, an, dict(st, marker="LAT" if st["marker"] else "", device=""), size, rng)


def _lateral_pixels(an: dict, st: dict, x: np.ndarray, y: np.ndarray, tex: np.ndarray) -> np.ndarray:
    """Film density in [0, 1] at body-space points (x, y) of the lateral projection."""
    y_apex = an["y_apex"] + 0.02
    y_cp = an["y_cp"] + st["inspiration"] + 0.04
    height = y_cp - y_apex
    front, back = 0.5 - an["tw"] * 0.85, 0.5 + an["tw"] * 0.65  # retrosternal line, posterior lung edge
    tt = np.clip((y - np.float32(y_apex)) / np.float32(height), 0.0, 1.0)

    # Body: a convex anterior wall and back, raised arms over the upper third.
    wall_f = np.float32(front - 0.07) + np.float32(0.08) * (y - 0.55) ** 2
    wall_b = np.float32(back + 0.16) - np.float32(0.06) * (y - 0.5) ** 2
    thick = _ramp(x - wall_f, 0.03) * _ramp(wall_b - x, 0.04) * _ramp(y - np.float32(y_apex - 0.1), 0.12)
    arms = 0.3 * _ramp(np.float32(y_apex + 0.18) - y, 0.12)

    # Lungs: rounded apex, anterior edge behind the sternum; the domes slope down to the posterior sulcus.
    a_edge = np.float32(front) + np.float32(0.08) * (1.0 - tt) ** 2
    mid, half = (a_edge + np.float32(back)) * 0.5, (np.float32(back) - a_edge) * 0.5
    p = (x - mid) / half
    q = np.minimum((y - np.float32(y_apex + 0.3 * height)) / np.float32(0.3 * height), 0.0)
    shape = _ramp(1.0 - p * p * p * p - q * q, 0.3)
    sx = np.clip((x - np.float32(front)) / np.float32(back - front), 0.0, 1.1)
    y_dia = np.float32(y_cp - 0.1) + np.float32(0.1) * sx * sx - np.float32(an["dome"]) * sx * (1.0 - sx)
    lung = shape * _ramp(y_dia - y, 0.015)

    # Heart anterior and inferior on the diaphragm, hilum in the middle, trachea running down to it.
    hw = an["ctr"] * an["tw"] * 0.95
    hx, hy = front + hw * 0.85, y_cp - 0.1 - hw * 0.45
    heart = _ramp(
        1.0
        - ((x - np.float32(hx)) / np.float32(hw)) ** 2
        - ((y - np.float32(hy)) / np.float32(hw * 0.85)) ** 2,
        0.2,
    )
    hil = np.exp(-((x - np.float32(0.52)) ** 2 * 90.0 + (y - np.float32(y_apex + 0.35 * height)) ** 2 * 60.0))
    tx = np.float32(0.47) + np.float32(0.1) * (y - np.float32(y_apex))
    trachea = _ramp(np.float32(0.018) - np.abs(x - tx), 0.01) * _ramp(
        np.float32(y_apex + 0.3 * height) - y, 0.04
    )
    air = np.maximum(lung * (1.0 - 0.9 * heart) * (1.0 - 0.5 * hil), 0.5 * trachea)
    air *= 1.0 - 0.06 * tex
    sev = max(st["effusion"].values(), default=0.0)
    if sev:  # fluid gathers in the posterior costophrenic sulcus and climbs the posterior wall
        lvl = (
            np.float32(y_cp - sev * 0.5 * height) - np.float32(0.05 + 0.12 * sev) * np.clip(sx, 0.0, 1.0) ** 2
        )
        air *= 1.0 - 0.9 * _ramp(y - lvl, 0.03 + 0.04 * sev)
    air *= np.float32(an["air"] * 0.75)

    # Bones: vertebral bodies stacked behind the lungs (with a slight kyphosis), the sternum in front.
    spx = np.float32(back + 0.07) + np.float32(0.05) * (y - 0.5) ** 2
    sp = _ramp(np.float32(0.045) - np.abs(x - spx), 0.012)
    spine = sp * (0.6 + 0.4 * np.clip(np.cos(np.float32(2 * np.pi / 0.06) * y) * 2.0 + 0.5, 0.0, 1.0))
    sternum = _ramp(np.float32(0.012) - np.abs(x - np.float32(front - 0.035)), 0.01)
    sternum *= _ramp(y - np.float32(y_apex + 0.05), 0.02) * _ramp(np.float32(y_cp - 0.15) - y, 0.03)
    bone = (0.3 * spine + 0.25 * sternum) * np.float32(an["bone"])
    atten = thick * (1.05 + arms - 0.85 * air + bone)
    img = (1.0 - np.exp(-np.float32(st["k"]) * atten)) / np.float32(1.0 - math.exp(-st["k"] * 1.6))
    img = np.clip((img - np.float32(st["lo"])) / np.float32(st["hi"] - st["lo"]), 0.0, 1.0)
    return img ** np.float32(st["gamma"])


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _draw_overlays(im: Image.Image, st: dict, size: int, an: dict, rng: np.random.Generator) -> None:
    """Burned-in text marker in a corner and support devices (ECG leads, a central line, a tube)."""
    draw = ImageDraw.Draw(im)
    s = size / 256
    if st["marker"]:
        font = _font(max(6, int(round(13 * s))))
        x0, y0, x1, y1 = draw.textbbox((0, 0), st["marker"], font=font)
        w, h = x1 - x0 + 6 * s, y1 - y0 + 6 * s
        px = 6 * s if st["corner"] % 2 == 0 else size - w - 6 * s
        py = 6 * s if st["corner"] < 2 else size - h - 6 * s
        draw.rectangle([px, py, px + w, py + h], fill=int(rng.integers(10, 40)))
        draw.text(
            (px + 3 * s - x0, py + 3 * s - y0), st["marker"], fill=int(rng.integers(215, 250)), font=font
        )
    dev = st.get("device", "")
    if not dev:
        return
    cx, tw, ya = an["cx"] * size, an["tw"] * size, an["y_apex"] * size
    fill = int(rng.integers(225, 255))
    if dev == "ecg":
        for _ in range(int(rng.integers(2, 5))):
            ex = cx + rng.uniform(-1, 1) * tw * 0.9
            ey = ya + rng.uniform(0.05, 0.6) * size
            r = 5 * s
            draw.ellipse([ex - r, ey - r, ex + r, ey + r], outline=fill, width=max(1, int(2 * s)))
    elif dev == "line":
        sx = cx + rng.choice([-1, 1]) * tw * rng.uniform(0.5, 0.8)
        pts = [
            (sx, ya),
            (sx * 0.6 + cx * 0.4, ya + 0.1 * size),
            (cx - 0.02 * size, ya + 0.2 * size),
            (cx - 0.03 * size, ya + rng.uniform(0.28, 0.36) * size),
        ]
        draw.line(pts, fill=fill, width=max(1, int(round(1.5 * s))), joint="curve")
    else:
        tip = ya + rng.uniform(0.12, 0.2) * size
        draw.line([(cx, 0), (cx + 2 * s, tip)], fill=fill, width=max(1, int(round(3 * s))))


def _spokes(seed: int, n: int = 720) -> np.ndarray:
    """Angular profile of the vessel tree: thin random spokes (1 on a vessel, 0 between)."""
    rng = np.random.default_rng([seed, 7])
    prof = np.zeros(n + 1, dtype=np.float32)
    centres = rng.integers(0, n, 90)
    prof[np.concatenate([centres, (centres + 1) % n])] = np.tile(rng.uniform(0.3, 1.0, 90), 2)
    prof[n] = prof[0]
    return prof


def _add_noise(img: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    img += noise * np.float32(sd * 255.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
