"""Materialised dataset versions as users see them: the manifest, a torch dataset, the datasheet.

A version folder (``lake/versions/<name>/``, or wherever ``dvc pull`` put it) holds::

    manifest.parquet      one row per image: image_id, split, label columns, group, file paths
    lineage.parquet       what happened to every image of the parent, rule by rule
    annotations.parquet   every annotation row of the kept images
    version.json          recipe, parent, input fingerprints (no times: deterministic)
    DATASHEET.md          what it is, counts, changes and why, licences and citations
    images/<split>/<label>/...       original files (hardlinked where possible)
    images_<size>/<split>/<label>/   bicubic resizes from the originals (PNG)
    shards/                          instead of the image folders with ``pack: shards``:
                                     tar shards + index.parquet (see :mod:`catalog.shards`)
    <name>_<size>.npz                MedMNIST-style arrays (optional)

Nothing here needs the CLI or a workspace: ``load_version(path)`` reads the manifest.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from medlake.catalog import shards
from medlake.catalog.errors import CatalogError

MANIFEST_SCHEMA_VERSION = 1
META_KEY = b"medlake.manifest_schema"
LABELS_KEY = b"medlake.labels"


def manifest_metadata(version: str, labels: dict[str, str]) -> dict[bytes, bytes]:
    """Parquet key-value metadata of a manifest: schema version, version name, label sources."""
    return {
        META_KEY: str(MANIFEST_SCHEMA_VERSION).encode(),
        b"medlake.version": version.encode(),
        LABELS_KEY: json.dumps(labels, sort_keys=True).encode(),
    }


def load_version(path: Path | str) -> pl.DataFrame:
    """The manifest of a materialised version as a Polars frame.

    Parameters
    ----------
    path
        The version folder (``lake/versions/<name>``) or its ``manifest.parquet``.

    Returns
    -------
    polars.DataFrame
        One row per image: ``image_id, native_id, split``, one column per label, ``group_id``,
        ``unit``, ``file`` (relative to the folder, null for metadata-only datasets) and
        ``file_<size>`` for each resized copy.

    Raises
    ------
    CatalogError
        When the folder has no manifest, or its schema version is newer than this medlake.

    Example
    -------
    >>> m = load_version("lake/versions/ham10000-corrected")  # doctest: +SKIP
    >>> m.group_by("split").len()  # doctest: +SKIP
    """
    p = Path(path)
    f = p if p.suffix == ".parquet" else p / "manifest.parquet"
    if not f.is_file():
        raise CatalogError(
            f"{f}: no manifest; is this a medlake version folder? ('dvc pull' it, or "
            "'medlake materialize RECIPE' to build it)"
        )
    meta = pq.read_schema(f).metadata or {}
    raw = meta.get(META_KEY)
    if raw is None:
        raise CatalogError(f"{f}: not a medlake manifest (no '{META_KEY.decode()}' metadata)")
    if int(raw) > MANIFEST_SCHEMA_VERSION:
        raise CatalogError(
            f"{f}: manifest schema {int(raw)} is newer than this medlake understands "
            f"({MANIFEST_SCHEMA_VERSION}); upgrade medlake"
        )
    return pl.read_parquet(f)


def label_sources(path: Path | str) -> dict[str, str]:
    """``{label column: 'source/finding'}`` recorded in a version's manifest."""
    p = Path(path)
    f = p if p.suffix == ".parquet" else p / "manifest.parquet"
    return json.loads((pq.read_schema(f).metadata or {}).get(LABELS_KEY, b"{}"))


DEFAULT_SIZE = 224  # VersionDataset's default square side (a DataLoader batches it as it is)


class VersionDataset:
    """A map-style torch dataset over one split of a materialised version.

    Items are ``(image, label_index)``: ``image`` a float tensor ``3 x R x R`` in [0, 1] with
    ``R = resize`` (default :data:`DEFAULT_SIZE` = 224, bicubic), so a ``DataLoader`` batches
    it as it is (or whatever ``transform`` returns from the PIL image; ``resize=None`` keeps
    each image's own size); ``label_index`` the position of the image's label in
    :attr:`classes` (the sorted labels of the whole version, so indices agree across splits),
    or what ``target_transform`` returns from it.

    Example
    -------
    >>> from torch.utils.data import DataLoader                      # doctest: +SKIP
    >>> ds = VersionDataset("lake/versions/synth-derm-clean", "train")  # doctest: +SKIP
    >>> x, y = next(iter(DataLoader(ds, batch_size=16)))             # doctest: +SKIP
    >>> x.shape                                                      # doctest: +SKIP
    torch.Size([16, 3, 224, 224])

    Parameters
    ----------
    path
        The version folder.
    split
        ``train``, ``val`` or ``test`` (any split the manifest holds).
    label
        Label column (default: the first one).
    size
        Read the exported ``images_<size>`` copies instead of the originals.
    resize
        Square side the image is resized to when no ``transform`` is given; ``"auto"``
        (default): :data:`DEFAULT_SIZE`, or as stored when ``size`` picks exported copies;
        None: as stored.
    transform, target_transform
        Applied to the PIL image (RGB) and to the label index.

    Raises
    ------
    CatalogError
        When the split, label or size is not in the version, or it holds no image files.
    """

    def __init__(
        self, path: Path | str, split: str, *, label: str | None = None, size: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        resize: int | None | str = "auto",
    ) -> None:
        self.root = Path(path)
        m = load_version(self.root)
        labels = list(label_sources(self.root))
        if label is None:
            if not labels:
                raise CatalogError(f"{self.root.name}: the version has no label column")
            label = labels[0]
        if label not in m.columns:
            raise CatalogError(f"{self.root.name}: no label column '{label}' (have {labels})")
        col = "file" if size is None else f"file_{size}"
        if col not in m.columns:
            sizes = [c[5:] for c in m.columns if c.startswith("file_")]
            raise CatalogError(f"{self.root.name}: no images of size {size} (sizes: {sizes})")
        if split not in set(m["split"].drop_nulls().to_list()):
            raise CatalogError(f"{self.root.name}: no split '{split}' "
                               f"(splits: {sorted(m['split'].drop_nulls().unique().to_list())})")
        self.classes = sorted(m[label].drop_nulls().unique().to_list())
        rows = m.filter(pl.col("split") == split).sort("image_id")
        if rows[col].null_count():
            raise CatalogError(f"{self.root.name}: the version holds no image files "
                               "(metadata-only dataset); use load_version() for the manifest")
        self.files = rows[col].to_list()
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = [index.get(v, -1) for v in rows[label].to_list()]
        self.image_ids = rows["image_id"].to_list()
        self.transform = transform
        self.target_transform = target_transform
        # default: DEFAULT_SIZE, unless an exported size was chosen (already square)
        self.resize = (None if size is not None else DEFAULT_SIZE) if resize == "auto" else resize
        # a packed version (export pack: shards) is read straight from its tar shards
        self._index = shards.index(self.root) if shards.is_packed(self.root) else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        f = self.files[i]
        if self._index is not None and not (self.root / f).is_file():
            src: Any = io.BytesIO(shards.read_bytes(self.root, f, self._index))
        else:
            src = self.root / f
        with Image.open(src) as im:
            img = im.convert("RGB")
        y: Any = self.targets[i]
        if self.target_transform is not None:
            y = self.target_transform(y)
        if self.transform is not None:
            return self.transform(img), y
        import numpy as np
        import torch

        if self.resize is not None and img.size != (self.resize, self.resize):
            img = img.resize((self.resize, self.resize), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), y


# --- datasheet ------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v).replace("|", "\\|")


def render_datasheet(info: dict[str, Any]) -> str:
    """The ``DATASHEET.md`` text of a version from the facts ``materialize`` gathered.

    ``info`` keys: name, dataset (dict of the datasets row), parent, recipe_file,
    recipe_hash, description, counts (split -> n), label_counts (label -> split -> value -> n),
    rules (list of {rule, action, n, reason}), leakage_before / leakage_after (dicts with
    n_groups, n_groups_total, n_images), agreement (list of lines), limitations (lines),
    sources (list of {source_id, kind, rule}), inputs (file -> sha256), images (bool).
    Deterministic: no times, no machine paths.
    """
    ds = info["dataset"]
    lines = [f"# Datasheet: {info['name']}", ""]
    lines += [
        "## What it is", "",
        (f"A corrected version of **{ds.get('name') or ds.get('dataset_id')}** "
        f"(`{ds.get('dataset_id')}`), derived from `{info['parent']}` by the recipe "
        f"`{info['recipe_file']}` (sha256 `{info['recipe_hash'][:16]}`)."),
    ]
    if info.get("description"):
        lines += ["", info["description"].strip()]
    lines += ["", f"Modality: {ds.get('modality') or 'not stated'}. "
              + ("Image files are included." if info.get("images") else
                 "Metadata only: the source images are not part of this version.")]
    counts = info["counts"]
    total = sum(counts.values())
    lines += ["", "## Counts per split", "",
              _table(["split", "images"], [[k, v] for k, v in counts.items()] + [["all", total]])]
    for lab, per in info.get("label_counts", {}).items():
        values = sorted({v for d in per.values() for v in d}, key=str)
        splits = list(per)
        rows = [[v, *[per[s].get(v, 0) for s in splits]] for v in values]
        lines += ["", f"### Label `{lab}`", "", _table([lab, *splits], rows)]
    lines += ["", "## What changed against the parent, and why", ""]
    if info["rules"]:
        lines += [_table(["step", "rule", "action", "images", "reason"],
                         [[r["step"], r["rule"], r["action"], r["n"], r["reason"]]
                          for r in info["rules"]])]
    else:
        lines += ["Nothing: every image of the parent is kept unchanged."]
    lines += ["", "Every image's fate is in `lineage.parquet` (one row per image and rule)."]
    lb, la = info.get("leakage_before"), info.get("leakage_after")
    lines += ["", "## Leakage (groups spanning splits)", ""]
    if lb is None and la is None:
        lines += ["Not applicable: the parent has no splits."]
    else:
        rows = []
        for when, d in (("parent", lb), ("this version", la)):
            if d is not None:
                rows.append([when, d["n_groups"], d["n_groups_total"], d["n_images"], d["n_pairs"]])
        lines += [_table(["", "groups spanning splits", "groups", "images in them",
                          "cross-split pairs"], rows),
                  "", "Groups are patients/lesions joined with duplicate clusters and pairs."]
    lines += ["", "## Label agreement", ""]
    lines += info.get("agreement") or ["Not computed for this dataset (run `medlake agreement`)."]
    lines += ["", "## Label sources", ""]
    lines += [_table(["source", "kind", "rule"], [[s["source_id"], s["kind"], s["rule"]]
                                                  for s in info.get("sources", [])])]
    lines += ["", "## Known limitations", ""]
    lines += [f"- {x}" for x in info.get("limitations", [])] or ["- None recorded."]
    priv = info.get("privacy") or {}
    lines += ["", "## Privacy", ""]
    if priv.get("identifying"):
        lines += [f"{priv['identifying']:,} images carry identifying DICOM tags."]
        lines += ([f"Publishing acknowledged by the recipe (privacy.acknowledged): "
                   f"\"{priv['acknowledged']}\""] if priv.get("acknowledged") else
                  ["Not acknowledged: 'medlake publish' refuses this version."])
    else:
        lines += ["No image of this version carries identifying DICOM tags known to medlake."
                  + (f" Acknowledgement recorded: \"{priv['acknowledged']}\"."
                     if priv.get("acknowledged") else "")]
    env = info.get("environment") or {}
    if env:
        lines += ["", "## Environment", "",
                  f"- medlake {env.get('medlake_version')}"
                  + (f", installed from a lock file with sha256 `{env['lock_sha256'][:16]}`"
                     if env.get("lock_sha256") else "")]
    lines += ["", "## Licence and citation", "",
              (f"- **{ds.get('name')}**: licence: {ds.get('license') or 'not stated'}. "
              f"Cite: {(ds.get('citation') or 'not stated').rstrip('.')}.")]
    for f, meta in sorted(info.get("inputs", {}).items()):
        lines.append(f"- input `{f}` (sha256 `{str(meta)[:16]}`): "
                     "check its own licence before redistribution.")
    lines += ["", ("Several public medical image sets are licensed for non-commercial use only; "
              "the licence of every source above applies to this version.")]
    return "\n".join(lines) + "\n"
