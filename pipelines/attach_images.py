"""Stage ``attach-images``: give a metadata-only dataset its pixels.

The public datasets ship labels without images. A user who has the images points medlake at
the folder (``medlake attach-images ham10000 ~/data/HAM10000_images``); files are matched to
the dataset's images by native id, searched recursively, in this order of preference: the
path relative to the folder, that path without its extension, the file name, the file name
without its extension. Matched files are read (thread pool) for sha256, width, height and
mode, and DICOM files for their identifying tags (``phi_tags``).

Ownership: the ``images`` rows belong to the ingest stage, so this stage rewrites the
dataset's ``images/ingest/<partition>.parquet`` file(s) and its ``datasets`` row (for
``images_root``) in one :class:`catalog.Transaction`; its own quarantine rows go to
``quarantine/attach-images/<dataset>.parquet``. Re-ingesting the dataset rewrites those
partitions from the metadata alone, so run attach-images again after a re-ingest.

Every file found is matched or quarantined (files found = matched + quarantined): files that
match no id, match several ids, several files matching one id, unreadable images, and
symlinks resolving outside the folder. Ids without a file keep null pixels fields and are
counted in the summary.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from medlake.catalog import Catalog, CatalogError, IngestError, Quarantine
from medlake.catalog.imageio import MAX_PIXELS, ImageReadError, InsideResolver, inspect_many

log = logging.getLogger(__name__)

STAGE = "attach-images"
NO_ID = "matches no image id of the dataset"
MANY_IDS = "matches several image ids (ambiguous)"
MANY_FILES = "several files match one image id (ambiguous)"
PIXEL_COLUMNS = ("path", "sha256", "width", "height", "mode", "phi_tags")


@dataclass(frozen=True)
class AttachResult:
    """What :func:`run` did. ``files_found == matched + files_quarantined`` always."""

    dataset_id: str
    images_root: str
    n_ids: int
    files_found: int
    matched: int
    files_quarantined: int
    unmatched_ids: int
    first_unmatched_ids: tuple[str, ...]
    first_unmatched_files: tuple[str, ...]
    reasons: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.files_found != self.matched + self.files_quarantined:
            raise RuntimeError(
                f"attach-images lost files: {self.files_found} found, {self.matched} matched, "
                f"{self.files_quarantined} quarantined (a medlake bug)"
            )

    def summary(self) -> str:
        lines = [
            (f"{self.images_root}: {self.files_found:,} files found = {self.matched:,} matched + "
            f"{self.files_quarantined:,} quarantined"),
        ]
        for reason, n in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  quarantined {n:,}: {reason}")
        if self.first_unmatched_files:
            lines.append(f"  unmatched files (first): {', '.join(self.first_unmatched_files)}")
        lines.append(
            f"dataset '{self.dataset_id}': {self.matched:,} of {self.n_ids:,} images have a file; "
            f"{self.unmatched_ids:,} ids without one"
            + (f" (first: {', '.join(self.first_unmatched_ids)})" if self.unmatched_ids else "")
        )
        if self.dry_run:
            lines.append("dry run: nothing written")
        return "\n".join(lines)


def list_files(folder: Path) -> list[str]:
    """Every non-hidden file under ``folder`` (recursive, symlinked folders not followed),
    as sorted '/'-separated paths relative to ``folder``."""
    out = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        rel = Path(d).relative_to(folder)
        out += [(rel / f).as_posix() for f in files if not f.startswith(".")]
        # a symlinked folder is not walked; list it so an escaping one is reported
        out += [(rel / x).as_posix() for x in dirs if (Path(d) / x).is_symlink()]
    return sorted(out)


def _keys(rel: str) -> list[str]:
    """Match keys of one file, most exact first."""
    name = rel.rsplit("/", 1)[-1]
    no_ext = rel.rsplit(".", 1)[0] if "." in name else rel
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return list(dict.fromkeys([rel, no_ext, name, stem]))


def match(ids: list[str], files: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Match native ids to files. Returns ``({id: file}, {file: quarantine reason})``.

    A file's most exact key decides: a file matching several ids at its best level, or an id
    matched by several files at the id's best level, is ambiguous and left unmatched.
    """
    idset = set(ids)
    claims: dict[str, list[tuple[int, str]]] = {}
    rejected: dict[str, str] = {}
    for f in files:
        hits = [(lvl, k) for lvl, k in enumerate(_keys(f)) if k in idset]
        if not hits:
            rejected[f] = NO_ID
            continue
        best = min(lvl for lvl, _ in hits)
        at_best = {k for lvl, k in hits if lvl == best}
        if len(at_best) > 1:
            rejected[f] = MANY_IDS
            continue
        claims.setdefault(at_best.pop(), []).append((best, f))
    matched: dict[str, str] = {}
    for i, cands in claims.items():
        best = min(lvl for lvl, _ in cands)
        top = sorted(f for lvl, f in cands if lvl == best)
        if len(top) > 1:
            for f in top:
                rejected[f] = MANY_FILES
        else:
            matched[i] = top[0]
        for lvl, f in cands:
            if lvl != best:
                rejected[f] = MANY_FILES
    return matched, rejected


def run(
    catalog: Catalog, dataset_id: str, folder: Path | str, *, strict: bool = False,
    dry_run: bool = False, max_pixels: int = MAX_PIXELS,
) -> AttachResult:
    """Attach the image files under ``folder`` to the ingested dataset ``dataset_id``.

    Parameters
    ----------
    dataset_id
        An ingested dataset (``medlake sql "SELECT dataset_id FROM datasets"``).
    folder
        The folder holding the images (searched recursively).
    strict
        Raise at the first file that would be quarantined instead of writing anything.
    dry_run
        Match and read, report, write nothing.

    Returns
    -------
    AttachResult
        Counts: files found, matched and quarantined (with reasons), ids without a file.

    Raises
    ------
    CatalogError
        The dataset is not ingested or ``folder`` is not a folder; ``IngestError`` with
        ``strict`` when a file is bad or matches no id.

    Example
    -------
    >>> res = run(cat, "ham10000", "~/data/HAM10000_images")  # doctest: +SKIP
    >>> print(res.summary())  # doctest: +SKIP
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise CatalogError(f"{folder}: no such folder; give the folder that holds the image files")
    ids_df = catalog.image_ids(dataset_id)
    if ids_df.height == 0:
        known = ", ".join(catalog.dataset_ids()) or "none yet"
        raise CatalogError(
            f"dataset '{dataset_id}' has no images in this workspace (ingested datasets: {known}); "
            "ingest it first with 'medlake ingest FORMAT FILE'"
        )
    root_text = Path(catalog.ws.relpath(root)).as_posix()
    q = Quarantine(dataset_id, strict=False, stage=STAGE)
    found = 0
    inside: list[str] = []
    resolve = InsideResolver(root)  # each folder resolved once for the whole listing
    for f in list_files(root):
        try:
            target = resolve(f)
        except ImageReadError as e:
            found += 1
            q.add(root_text, 0, f, e.reason, e.detail)
            continue
        if target.is_dir():
            continue  # a symlinked folder inside the root: its files are walked where they are
        found += 1
        inside.append(f)
    native = sorted(ids_df["native_id"].to_list())
    matched, rejected = match(native, inside)
    infos = dict(zip(sorted(matched), inspect_many([root / matched[i] for i in sorted(matched)], max_pixels=max_pixels)))
    for i, info in infos.items():
        if not info.ok:
            rejected[matched.pop(i)] = info.reason or "unreadable"
    for f in sorted(rejected):
        q.add(root_text, 0, f, rejected[f])
    if strict and q.count():
        first = q.frame().sort("item").row(0, named=True)
        raise IngestError(
            f"{root_text}: {first['item']}: {first['reason']}; {q.count():,} files in all would be "
            "quarantined. Stopped because of --strict; without it they go to the quarantine "
            "table and the other files are attached."
        )
    unmatched_ids = [i for i in native if i not in matched]
    res = AttachResult(
        dataset_id=dataset_id, images_root=root_text, n_ids=len(native), files_found=found,
        matched=len(matched), files_quarantined=q.count(), unmatched_ids=len(unmatched_ids),
        first_unmatched_ids=tuple(unmatched_ids[:5]),
        first_unmatched_files=tuple(sorted(f for f, r in rejected.items() if r == NO_ID)[:5]),
        reasons=q.reasons(), dry_run=dry_run,
    )
    if not dry_run:
        pixels = pl.DataFrame(
            [{"image_id": f"{dataset_id}:{i}", "path": matched[i], "sha256": infos[i].sha256,
              "width": infos[i].width, "height": infos[i].height, "mode": infos[i].mode,
              "phi_tags": infos[i].phi_tags, "_study": infos[i].study_uid,
              "_series": infos[i].series_uid, "_modality": infos[i].modality, "_view": infos[i].view}
             for i in sorted(matched)],
            schema={"image_id": pl.String, "path": pl.String, "sha256": pl.String, "width": pl.Int32,
                    "height": pl.Int32, "mode": pl.String, "phi_tags": pl.String, "_study": pl.String,
                    "_series": pl.String, "_modality": pl.String, "_view": pl.String},
        )
        _write(catalog, dataset_id, root_text, pixels, q)
    log.info("attach-images %s: %d matched", dataset_id, len(matched))
    return res


def _write(catalog: Catalog, dataset_id: str, root_text: str, pixels: pl.DataFrame, q: Quarantine) -> None:
    """Rewrite the dataset's ingest partitions of images and datasets, and our quarantine."""
    store = catalog.tables
    with catalog.transaction() as tx:
        for table in ("images", "datasets"):
            touched = False
            for f in store.files(table, stage="ingest"):
                df = pl.DataFrame(pl.from_arrow(pq.read_table(f)))
                mine = pl.col("dataset_id") == dataset_id
                if not df.select(mine.any()).item():
                    continue
                touched = True
                if table == "datasets":
                    df = df.with_columns(pl.when(mine).then(pl.lit(root_text)).otherwise(pl.col("images_root")).alias("images_root"))
                else:
                    df = _fill(df, pixels, mine)
                tx.write(table, df, stage="ingest", partition=f.stem)
            if not touched:
                raise CatalogError(f"dataset '{dataset_id}' has no '{table}' rows written by ingest; re-ingest it")
        qf = q.frame()
        if qf.height:
            tx.write("quarantine", qf.sort(["item", "reason"]), stage=STAGE, partition=dataset_id)
        else:
            tx.delete("quarantine", stage=STAGE, partition=dataset_id)


def _fill(df: pl.DataFrame, pixels: pl.DataFrame, mine: pl.Expr) -> pl.DataFrame:
    """Set the pixel columns of this dataset's rows (null where no file matched)."""
    cols = df.columns
    j = df.join(pixels.rename({c: f"_new_{c}" for c in PIXEL_COLUMNS}), on="image_id", how="left",
                maintain_order="left")
    upd = [pl.when(mine).then(pl.col(f"_new_{c}")).otherwise(pl.col(c)).cast(df.schema[c]).alias(c)
           for c in PIXEL_COLUMNS]
    upd += [pl.when(mine).then(pl.coalesce(pl.col(c), pl.col(n))).otherwise(pl.col(c)).alias(c)
            for c, n in (("study_id", "_study"), ("series_id", "_series"), ("modality", "_modality"),
                         ("view", "_view"))]
    return j.with_columns(upd).select(cols)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("attach-images")
