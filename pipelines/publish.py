"""``medlake publish NAME``: a version published the way DVC data registries do it.

1. the recipe is in the pipeline (``params.yaml: materialize.recipes``, ``dvc.yaml``) and
   ``dvc repro materialize@NAME`` brings it and everything upstream up to date;
2. the privacy gate: no image of the version may carry identifying DICOM tags
   (``images.phi_tags``) and every DICOM image must carry the de-identification markers
   (Patient Identity Removed = YES and a De-identification Method), unless the recipe says
   why it may (``privacy: {acknowledged: TEXT}``, which the datasheet shows);
3. ``dvc.yaml``, ``dvc.lock``, ``params.yaml`` and the recipe are committed, the version's
   data is pushed to the workspace's DVC remote (``dvc push materialize@NAME``), and the
   commit is tagged ``NAME@vN`` (N = 1 + the highest existing tag of NAME).

A consumer without medlake then runs ``git clone`` + ``dvc pull lake/versions/NAME``, or
``dvc import REPO lake/versions/NAME --rev NAME@vN`` (and later ``dvc update``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, CatalogError, run_dvc

DEID_MARKERS = ("PatientIdentityRemoved", "DeidentificationMethod")


@dataclass(frozen=True)
class PrivacyReport:
    """What the gate found in one version."""

    images: int
    dicom: int
    identifying: int  # images whose images.phi_tags names identifying tags
    unmarked: int  # DICOM images without both de-identification markers
    example: str | None  # one offending image id, for the message

    @property
    def clean(self) -> bool:
        return self.identifying == 0 and self.unmarked == 0

    def describe(self) -> str:
        return (f"{self.identifying:,} of {self.images:,} images carry identifying DICOM tags "
                f"and {self.unmarked:,} of {self.dicom:,} DICOM images lack the de-identification "
                "markers (Patient Identity Removed = YES, De-identification Method)"
                + (f"; e.g. '{self.example}'" if self.example else ""))


@dataclass(frozen=True)
class PublishResult:
    name: str
    tag: str
    commit: str
    pushed: str
    privacy: PrivacyReport

    def summary(self) -> str:
        return (f"published {self.name} as tag {self.tag} (commit {self.commit[:10]}); "
                f"{self.pushed}\n"
                f"consumers: dvc import <this repo> lake/versions/{self.name} --rev {self.tag}")


def privacy_report(catalog: Catalog, name: str) -> PrivacyReport:
    """Check the images of version ``name`` for identifying tags and de-identification markers."""
    from medlake.catalog.versions import load_version

    folder = catalog.ws.versions_dir / name
    man = load_version(folder).select("image_id")
    img = catalog.read("images", columns=["image_id", "dataset_id", "path", "phi_tags"])
    df = man.join(img, on="image_id", how="left")
    dicom = df.filter(pl.col("phi_tags").is_not_null())
    ident = dicom.filter(pl.col("phi_tags") != "")
    unmarked: list[str] = []
    if dicom.height:
        roots = dict(catalog.read("datasets", columns=["dataset_id", "images_root"]).iter_rows())
        for r in dicom.iter_rows(named=True):
            if not _marked(catalog, roots.get(r["dataset_id"]), r["path"]):
                unmarked.append(r["image_id"])
    example = (ident["image_id"].to_list() or unmarked or [None])[0]
    return PrivacyReport(images=man.height, dicom=dicom.height, identifying=ident.height,
                         unmarked=len(unmarked), example=example)


def _marked(catalog: Catalog, root: str | None, path: str | None) -> bool:
    import pydicom

    from medlake.catalog.paths import image_file

    try:
        f = image_file(catalog.ws.root, root, path)
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - an unreadable header has no markers
        return False
    removed = str(getattr(ds, "PatientIdentityRemoved", "") or "").strip().upper() == "YES"
    method = bool(str(getattr(ds, "DeidentificationMethod", "") or "").strip()
                  or getattr(ds, "DeidentificationMethodCodeSequence", None))
    return removed and method


def _git(args: list[str], cwd: Path) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise CatalogError(f"'git {' '.join(args)}' failed in {cwd.name}: "
                           f"{(res.stdout + res.stderr).strip()[-2000:]}")
    return res.stdout


def next_tag(root: Path, name: str) -> str:
    """``NAME@vN`` with N one above the highest existing ``NAME@v*`` tag."""
    tags = _git(["tag", "--list", f"{name}@v*"], root).split()
    nums = [int(m.group(1)) for t in tags if (m := re.fullmatch(rf"{re.escape(name)}@v(\d+)", t))]
    return f"{name}@v{max(nums, default=0) + 1}"


def run(catalog: Catalog, name: str, *, push: bool = True, repro: bool = True,
        echo: Callable[[str], None] | None = None) -> PublishResult:
    """Publish version ``name`` (see the module docstring).

    Raises
    ------
    CatalogError
        When the recipe is missing, the pipeline fails, the privacy gate refuses, or git/DVC
        fail; nothing is tagged then.
    """
    from medlake.catalog.recipes import load_recipe
    from medlake.pipelines import workspace_pipeline as wp

    ws = catalog.ws
    say = echo or (lambda s: None)
    recipe_file = ws.recipes_dir / f"{name}.yaml"
    rec = load_recipe(recipe_file)  # RecipeError names the file when it is missing or bad
    if not (ws.root / ".git").exists():
        raise CatalogError(f"{ws.root.name} is not a git repository; run 'medlake init' there")
    wp.record_recipe(ws, name, echo=say)
    if repro:
        say(f"dvc repro materialize@{name} ...")
        run_dvc(["repro", f"materialize@{name}"], ws.root)
    report = privacy_report(catalog, name)
    if not report.clean and not rec.privacy_ack:
        raise CatalogError(
            f"publish {name}: refused: {report.describe()}. De-identify the images and re-run, "
            f"or, if publishing them is allowed, say why in recipes/{name}.yaml "
            "(privacy: {acknowledged: \"...\"}); the datasheet records it")
    paths = [p for p in ("dvc.yaml", "dvc.lock", "params.yaml", ".gitignore", ".dvcignore",
                         "findings.yaml", f"recipes/{name}.yaml", ".dvc/config")
             if (ws.root / p).exists()]
    _git(["add", *paths], ws.root)
    staged = _git(["diff", "--cached", "--name-only"], ws.root).split()
    who = [] if _has_identity(ws.root) else ["-c", "user.name=medlake",
                                              "-c", "user.email=medlake@localhost"]
    if staged:
        _git([*who, "commit", "-q", "-m", f"publish {name}"], ws.root)
    commit = _git(["rev-parse", "HEAD"], ws.root).strip()
    pushed = "not pushed (--no-push)"
    if push:
        out = run_dvc(["push", f"materialize@{name}"], ws.root)
        pushed = (out.strip().splitlines() or ["pushed"])[-1]
    tag = next_tag(ws.root, name)
    _git([*who, "tag", "-a", tag, "-m", f"medlake version {name}: {report.images:,} images"], ws.root)
    return PublishResult(name=name, tag=tag, commit=commit, pushed=pushed, privacy=report)


def _has_identity(root: Path) -> bool:
    res = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True,
                         text=True, check=False)
    return bool(res.stdout.strip())


__all__ = ["PrivacyReport", "PublishResult", "next_tag", "privacy_report", "run"]
