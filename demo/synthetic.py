"""The demo's synthetic image datasets, with ground truth for duplicates and labels.

``generate(out_dir, n_captures=...)`` writes two datasets (dermoscopy-like colour images and
chest-X-ray-like greyscale images) that carry the problems medlake audits: patients and
lesions with several images whose images are split per image (so groups leak across
train/val/test), label sources that disagree, near duplicates of ten kinds derived from one
capture (crops of 40-90% of the area, kept or resized to the original size, to 224 x 224, to
a small square or by a factor, with five interpolations; JPEG quality 30-95; crops combined
with a mirror, rotation, relighting or JPEG), repeat captures of the same lesion or patient that look alike but are *not*
duplicates, non-medical outliers and one truncated file. Output is byte-identical for the same
arguments: a seeded numpy Generator per capture, fixed encoder settings, sorted listings and
no timestamps.

Layout of ``out_dir``::

    images/derm/D00001.jpg ...     images/cxr/C00001.png ...
    derm_manifest.csv  cxr_manifest.csv    one row per image file (labels, split, groups)
    derm.yaml  cxr.yaml                    generic-adapter configs (medlake ingest generic)
    truth_files.csv   every file: capture_id, role (original/derived/outlier/corrupt), transform,
                      crop (what followed a crop: kept, to_original, to_224, to_small, ...)
    truth_pairs.csv   every pair of files derived from one capture: file_a, file_b, kind, crop

Example
-------
>>> from medlake.demo.synthetic import generate
>>> s = generate("data/synthetic", n_captures=300)  # doctest: +SKIP
>>> print(s.text())  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlake.catalog import CatalogError
from medlake.demo import synth_build as build

MODALITIES = ("derm", "cxr")
KINDS = build.KINDS
CROP_KINDS = build.CROP_KINDS


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote: counts per modality and role."""

    out_dir: Path
    seed: int
    images: dict[str, int] = field(default_factory=dict)  # modality -> image files
    captures: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)  # lesions (derm) / patients (cxr)
    roles: dict[str, int] = field(default_factory=dict)  # original/derived/outlier/corrupt
    kinds: dict[str, int] = field(default_factory=dict)  # derived files per transform kind
    crops: dict[str, int] = field(default_factory=dict)  # cropped derived files per crop kind
    true_pairs: int = 0

    @property
    def n_images(self) -> int:
        return sum(self.images.values())

    def text(self) -> str:
        """A few human-readable lines."""
        per = ", ".join(f"{m}: {n}" for m, n in self.images.items())
        roles = ", ".join(f"{k} {v}" for k, v in self.roles.items())
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.items())
        crops = ", ".join(f"{k} {v}" for k, v in self.crops.items())
        return (
            f"wrote {self.n_images} images ({per}) to {self.out_dir}\n"
            f"  roles: {roles}\n  derived kinds: {kinds}\n  crops by what followed: {crops}\n"
            f"  true duplicate pairs: {self.true_pairs}; groups: {self.groups}"
        )


def generate(
    out_dir: Path | str,
    *,
    n_captures: int = 300,
    seed: int = 0,
    dup_rate: float = 0.35,
    hidden_rate: float = 0.2,
    modalities: tuple[str, ...] = MODALITIES,
    overwrite: bool = False,
    workers: int = 1,
    image_scale: float = 1.0,
) -> SynthSummary:
    """Write the synthetic datasets and their ground truth to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Folder to create. Written to a temporary sibling first and renamed at the end, so a
        failure never leaves half a dataset.
    n_captures : int
        Original captures in all (split evenly between ``modalities``). About 1.5 image files
        come out per capture (derived duplicates, outliers and one corrupt file added), so
        300 gives about 450 images and 3,400 about 5,000.
    seed : int
        Seed of every random choice; the same arguments give byte-identical files.
    dup_rate : float
        Fraction of captures that get near-duplicate files (1, sometimes 2, each).
    hidden_rate : float
        Fraction of derived files filed under a new, unrelated patient/lesion id (duplicates
        that group ids cannot reveal, as in public dermatology sets).
    modalities : tuple of str
        A subset of ``("derm", "cxr")``.
    overwrite : bool
        Replace ``out_dir`` when it exists and is not empty (refused by default).
    workers : int
        Processes drawing the captures (spawned; the calling script needs an
        ``if __name__ == "__main__":`` guard). The files are the same for any number.
    image_scale : float
        Size of the captures: 1 draws dermoscopy 160-256 px wide and chest X-rays 192-256 px
        (quick); 4 draws 640-1024 and 768-1024 px, the sizes of HAM10000 (600 x 450) and
        ChestX-ray14 (1024), where decoding and the resampling into the frames cost most.
        Derived files follow (a crop "to 224" stays 224 px).

    Returns
    -------
    SynthSummary

    Raises
    ------
    CatalogError
        Bad arguments, or ``out_dir`` exists with files and ``overwrite`` is false.
    """
    out = Path(out_dir)
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise CatalogError(f"synthetic: unknown modalities {bad}; choose from {list(MODALITIES)}")
    if n_captures < 2 * len(modalities):
        raise CatalogError(
            f"synthetic: n_captures={n_captures} is too small; give at least {2 * len(modalities)}"
        )
    if not (0.0 <= dup_rate <= 1.0 and 0.0 <= hidden_rate <= 1.0):
        raise CatalogError("synthetic: dup_rate and hidden_rate must lie in [0, 1]")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CatalogError(
            f"synthetic: '{out}' already exists and is not empty; pass overwrite=True "
            "(medlake synth --overwrite) to replace it, or choose another folder"
        )
    tmp = out.with_name(f".{out.name}.synth-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counts: dict[str, Any] = {k: {} for k in ("images", "captures", "groups", "roles", "kinds",
                                              "crops")}
    n_pairs = 0
    try:
        truth: list[dict[str, Any]] = []
        per = _share(n_captures, len(modalities))
        for mi, m in enumerate(modalities):
            files = build.build_modality(m, n=per[mi], seed=seed, mi=MODALITIES.index(m),
                                         dup_rate=dup_rate, hidden_rate=hidden_rate, root=tmp,
                                         workers=workers, image_scale=image_scale)
            truth += files
            counts["images"][m] = len(files)
            counts["captures"][m] = len({f["capture_id"] for f in files if f["role"] == "original"})
            counts["groups"][m] = len({f["group_id"] for f in files if f["role"] == "original"})
        for f in truth:
            counts["roles"][f["role"]] = counts["roles"].get(f["role"], 0) + 1
            if f["role"] == "derived":
                counts["kinds"][f["transform"]] = counts["kinds"].get(f["transform"], 0) + 1
                if f.get("crop"):
                    counts["crops"][f["crop"]] = counts["crops"].get(f["crop"], 0) + 1
        counts["kinds"] = {k: counts["kinds"][k] for k in KINDS if k in counts["kinds"]}
        counts["crops"] = {k: counts["crops"][k] for k in CROP_KINDS if k in counts["crops"]}
        truth.sort(key=lambda f: f["file"])
        build.write_csv(tmp / "truth_files.csv", truth, build.TRUTH_COLUMNS)
        pairs = true_pairs(truth)
        n_pairs = len(pairs)
        build.write_csv(tmp / "truth_pairs.csv", pairs,
                        ["file_a", "file_b", "kind", "crop", "capture_id"])
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthSummary(out, seed, true_pairs=n_pairs, **counts)


def true_pairs(truth: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of files derived from one capture (original and derived, or two derived).

    ``kind`` is the derived file's transform for an (original, derived) pair and
    ``sibling`` for two files derived from the same original; ``crop`` is the derived file's
    crop kind (:data:`CROP_KINDS`; "" when it was not cropped, and for siblings). Repeat captures of one
    patient or lesion have different capture ids, so they never form a true pair.
    """
    by_cap: dict[str, list[dict[str, Any]]] = {}
    for f in truth:
        if f["role"] in ("original", "derived"):
            by_cap.setdefault(f["capture_id"], []).append(f)
    rows = []
    for cap in sorted(by_cap):
        for a, b in itertools.combinations(sorted(by_cap[cap], key=lambda f: f["file"]), 2):
            crop = ""
            if "original" in (a["role"], b["role"]):
                d = b if a["role"] == "original" else a
                kind, crop = d["transform"], d.get("crop", "")
            else:
                kind = "sibling"
            rows.append({"file_a": a["file"], "file_b": b["file"], "kind": kind, "crop": crop,
                         "capture_id": cap})
    return rows


def _share(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


if __name__ == "__main__":
    from medlake.cli.main import run_stage

    run_stage("synth")
