"""The one image-path resolver: an image row (``images.path`` under ``datasets.images_root``)
to a file, refusing anything that escapes the workspace or the dataset's images root.

Every reader of image files uses it: the fingerprint, embed and duplicates stages
(:func:`image_files`), materialize's export, the privacy gate of ``medlake publish`` and the
UI (:func:`image_file`). ``..``, absolute paths and symlinks that lead outside give an
:class:`~medlake.catalog.imageio.ImageReadError` (reason ``path resolves outside the images
root`` or ``absolute path ...``), which stages turn into quarantine rows.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from medlake.catalog.imageio import ImageReadError, InsideResolver, resolve_inside


def images_root(ws_root: Path, root: str | None) -> Path:
    """The dataset's images folder (``datasets.images_root``, relative to the workspace),
    which must itself lie inside the workspace."""
    return resolve_inside(Path(ws_root), root or ".")


def image_file(ws_root: Path, root: str | None, path: str | None) -> Path:
    """The file of one image row.

    Raises
    ------
    ImageReadError
        No path recorded, or a path that resolves outside the images root or the workspace.
    """
    if not path:
        raise ImageReadError("", "no file recorded",
                             "attach the images with 'medlake attach-images DATASET FOLDER'")
    return resolve_inside(images_root(ws_root, root), path)


def image_files(cat, dataset_id: str | None = None) -> pl.DataFrame:
    """``image_id, dataset_id, sha256, modality, path, file, error`` of every image that has a
    path (of one dataset, or all), sorted by image id. ``file`` is the resolved absolute path,
    or null with ``error`` saying why it is refused."""
    images = cat.read("images", columns=["image_id", "dataset_id", "path", "sha256", "modality"],
                      required=True, hint="ingest a dataset first")
    roots = cat.read("datasets", columns=["dataset_id", "images_root", "modality"])
    df = images.join(roots.rename({"modality": "ds_modality"}), on="dataset_id", how="left")
    if dataset_id:
        df = df.filter(pl.col("dataset_id") == dataset_id)
    df = df.filter(pl.col("path").is_not_null() & pl.col("images_root").is_not_null())
    files, errors = [], []
    root_cache: dict[str, InsideResolver | ImageReadError] = {}
    for r, p in zip(df["images_root"], df["path"], strict=True):
        base = root_cache.get(r)
        if base is None:
            try:
                base = InsideResolver(images_root(cat.ws.root, r))
            except ImageReadError as e:
                base = e
            root_cache[r] = base
        try:
            if isinstance(base, ImageReadError):
                raise base
            files.append(str(base(p)))
            errors.append(None)
        except ImageReadError as e:
            files.append(None)
            errors.append(e.reason)
    return df.with_columns(pl.Series("file", files, dtype=pl.String),
                           pl.Series("error", errors, dtype=pl.String),
                           pl.coalesce("modality", "ds_modality").alias("modality")).sort("image_id")
