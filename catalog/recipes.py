"""Recipes: YAML files that describe a corrected dataset version, parsed and checked.

A recipe lives in ``recipes/NAME.yaml`` of a workspace::

    dataset: ham10000
    parent: ham10000@dermamnist          # a root '<dataset>@<scheme>' or a derived version
    labels:                              # manifest label columns: name -> source[/finding]
      dx: {source: "ham10000:dx", finding: dx}
      # edema: {source: "chexpert:report_nlp", finding: Edema, policy: U-Ones}
    duplicates:                          # duplicate evidence besides the clusters table
      clusters: true
      pairs: ["real:derm_corrected/ham10000_newly_discovered_duplicates.csv"]
      exclude_verdict: different         # pairs reviewers judged different are cut
    rules:                               # applied in order
      - drop_quality: [dark, blurry]     # fingerprint quality flags
      - relabel_from_reviews: {action: drop}
      - fix_leakage: {to: train}
    export: {images: true, sizes: [28, 64], npz: dx, pack: shards}

Paths are relative to the workspace, or to the real-data folder when they start with
``real:``. Every problem is reported as a :class:`RecipeError` naming the file, the key and
what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlake.catalog.errors import CatalogError
from medlake.catalog.reviews import VERDICTS
from medlake.catalog.shards import DEFAULT_SHARD_MB

RULES: dict[str, dict[str, Any]] = {
    # rule kind -> allowed parameters and their defaults (None: optional, no default)
    "fix_leakage": {"to": "train", "grouping": "duplicates"},
    "duplicates": {"mode": "keep_one", "labels": None},
    "drop_outliers": {"above": None, "list": None},
    "drop_unknown": {"labels": None, "values": ["-1", "unknown"]},
    "relabel": {"label": None, "source": None, "finding": None, "annotator": ""},
    "resplit": {
        "ratios": {"train": 0.7, "val": 0.1, "test": 0.2}, "seed": 0, "stratify": None,
        "grouping": "duplicates",
    },
    "drop_quality": {"flags": None},
    "relabel_from_reviews": {"label": None, "source": None, "finding": None,
                             "verdict": "wrong", "action": "drop", "value": None},
}
# rules whose parameters may be given as a bare list: the list becomes this parameter
LIST_PARAM = {"drop_quality": "flags"}
# the fingerprint stage's quality flags (pipelines/fingerprint.py, fingerprints.flags)
QUALITY_FLAGS = ("dark", "bright", "low_contrast", "blurry", "low_information", "tiny",
                 "extreme_aspect", "grey_as_colour", "inverted_xray", "rotated_xray")
CHOICES = {
    ("fix_leakage", "to"): ("train", "majority", "drop"),
    ("fix_leakage", "grouping"): ("group_id", "duplicates"),
    ("resplit", "grouping"): ("group_id", "duplicates"),
    ("duplicates", "mode"): ("keep_one", "keep_all"),
    ("relabel_from_reviews", "action"): ("drop", "flip", "set"),
    ("relabel_from_reviews", "verdict"): VERDICTS["label"],
}
TOP_KEYS = ("name", "dataset", "parent", "description", "labels", "duplicates", "rules", "export",
            "privacy")
PRIVACY_KEYS = ("acknowledged",)  # text: why a version with identifying tags may be published
EXPORT_KEYS = ("images", "sizes", "npz", "layout", "pack", "shard_mb")
DUP_KEYS = ("clusters", "pairs", "exclude_verdict")


class RecipeError(CatalogError):
    """A recipe file is missing, not valid YAML, or names an unknown rule or parameter."""


@dataclass(frozen=True)
class LabelSpec:
    """A manifest label column: values of ``source``'s ``finding`` (category, else value).

    ``policy``: ``(key, action)`` pairs of a :class:`catalog.consensus.CodePolicy` (what
    ``uncertain``, ``not_mentioned``, a graded value ... become: exclude -> null, negative
    -> ``0``, positive -> ``1``, category -> the meaning); empty: the stored values as they are.
    """

    name: str
    source: str
    finding: str | None = None
    annotator: str = ""
    policy: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Rule:
    """One step of a recipe. ``name`` is unique in the recipe (``kind`` or ``kind#2``)."""

    kind: str
    name: str
    step: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Export:
    """What to write besides the manifest: image files, resized copies, MedMNIST ``.npz``."""

    images: bool = True
    sizes: tuple[int, ...] = ()
    npz: str | None = None  # label column for the .npz arrays, or None
    layout: str = "split/label"
    pack: str | None = None  # "shards": image folders as tar shards + index (catalog.shards)
    shard_mb: int = DEFAULT_SHARD_MB


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe. ``hash`` is the sha256 of its canonical JSON content."""

    name: str
    file: str
    dataset: str
    parent: str
    labels: tuple[LabelSpec, ...]
    pairs: tuple[str, ...]
    use_clusters: bool
    rules: tuple[Rule, ...]
    export: Export
    description: str
    content: dict[str, Any]
    hash: str
    exclude_verdicts: tuple[str, ...] = ()  # pair verdicts (reviews) that cut duplicate links
    privacy_ack: str | None = None  # privacy.acknowledged: the publisher's reason (datasheet)

    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]


def recipe_path(ws_root: Path, name_or_path: str | Path) -> Path:
    """``recipes/NAME.yaml`` of the workspace, or the given path when it names a file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p if p.is_absolute() else (Path.cwd() / p if p.exists() else ws_root / p)
    return ws_root / "recipes" / f"{name_or_path}.yaml"


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file.

    Parameters
    ----------
    path
        The YAML file.

    Returns
    -------
    Recipe

    Raises
    ------
    RecipeError
        When the file is absent, not YAML, or a key, rule or parameter is unknown or has a
        wrong type; the message names the file, the key and what is allowed.

    Example
    -------
    >>> r = load_recipe("recipes/ham10000-corrected.yaml")  # doctest: +SKIP
    >>> [x.kind for x in r.rules]  # doctest: +SKIP
    ['fix_leakage']
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"{path}: no such recipe; recipes live in the workspace's recipes/ folder as NAME.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path.name}: not valid YAML ({e})") from e
    return parse_recipe(data, file=path.name, default_name=path.stem)


def parse_recipe(data: Any, *, file: str = "<recipe>", default_name: str = "version") -> Recipe:
    """Validate recipe content (already loaded from YAML); see :func:`load_recipe`."""
    where = file
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with keys {list(TOP_KEYS)}")
    _no_unknown(where, data, TOP_KEYS)
    for k in ("dataset", "parent"):
        if not isinstance(data.get(k), str) or not data[k]:
            raise RecipeError(f"{where}: '{k}' is required (a string), e.g. dataset: ham10000, "
                              "parent: ham10000@dermamnist")
    name = str(data.get("name") or default_name)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise RecipeError(f"{where}: name '{name}' may hold only letters, digits, '-', '_' and '.'")
    labels = _labels(where, data.get("labels") or {})
    dup = data.get("duplicates") or {}
    if not isinstance(dup, dict):
        raise RecipeError(f"{where}: 'duplicates' must be a mapping with keys {list(DUP_KEYS)}")
    _no_unknown(f"{where}: duplicates", dup, DUP_KEYS)
    excl = dup.get("exclude_verdict") or []
    excl = [excl] if isinstance(excl, str) else excl
    if not isinstance(excl, list) or not set(excl) <= {"different", "unclear"}:
        raise RecipeError(f"{where}: duplicates.exclude_verdict must be 'different' and/or "
                          f"'unclear' (review verdicts on pairs), not {excl!r}")
    pairs = dup.get("pairs") or []
    if isinstance(pairs, str):
        pairs = [pairs]
    if not isinstance(pairs, list) or not all(isinstance(p, str) for p in pairs):
        raise RecipeError(f"{where}: duplicates.pairs must be a list of CSV paths")
    rules = _rules(where, data.get("rules") or [], {lab.name for lab in labels})
    export = _export(where, data.get("export") or {}, {lab.name for lab in labels})
    content = json.loads(json.dumps(data, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return Recipe(
        name=name, file=file, dataset=data["dataset"], parent=data["parent"], labels=labels,
        pairs=tuple(pairs), use_clusters=bool(dup.get("clusters", True)), rules=rules,
        export=export, description=str(data.get("description") or ""), content=content,
        hash=digest, exclude_verdicts=tuple(sorted(set(excl))),
        privacy_ack=_privacy(where, data.get("privacy")),
    )


def _privacy(where: str, raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: 'privacy' must be a mapping with keys {list(PRIVACY_KEYS)}")
    _no_unknown(f"{where}: privacy", raw, PRIVACY_KEYS)
    ack = raw.get("acknowledged")
    if ack is not None and (not isinstance(ack, str) or not ack.strip()):
        raise RecipeError(f"{where}: privacy.acknowledged must be a non-empty text (why this "
                          "version may be published with identifying DICOM tags)")
    return ack.strip() if ack else None


def _no_unknown(where: str, d: dict[str, Any], allowed: tuple[str, ...]) -> None:
    bad = [k for k in d if k not in allowed]
    if bad:
        raise RecipeError(f"{where}: unknown key(s) {bad}; allowed: {list(allowed)}")


def _labels(where: str, raw: Any) -> tuple[LabelSpec, ...]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: 'labels' must map a column name to a source, "
                          "e.g. labels: {dx: 'ham10000:dx'}")
    out = []
    for name, v in raw.items():
        if isinstance(v, str):
            src, _, fin = v.partition("/")
            out.append(LabelSpec(str(name), src, fin or None))
        elif isinstance(v, dict) and isinstance(v.get("source"), str):
            _no_unknown(f"{where}: labels.{name}", v, ("source", "finding", "annotator", "policy"))
            policy: tuple[tuple[str, str], ...] = ()
            if v.get("policy") is not None:
                from medlake.catalog.consensus import CodePolicy

                try:
                    policy = CodePolicy.parse(
                        v["policy"], where=f"{where}: labels.{name}.policy").rules
                except CatalogError as e:
                    raise RecipeError(str(e)) from None
            out.append(LabelSpec(str(name), v["source"], v.get("finding"),
                                 str(v.get("annotator") or ""), policy))
        else:
            raise RecipeError(f"{where}: labels.{name} must be 'SOURCE[/FINDING]' or "
                              "{source: ..., finding: ..., annotator: ..., policy: ...}")
    return tuple(out)


def _rules(where: str, raw: Any, labels: set[str]) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise RecipeError(f"{where}: 'rules' must be a list such as [{{fix_leakage: {{to: train}}}}]")
    out: list[Rule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw, start=1):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}: rule {i} must be one 'KIND: {{params}}' mapping")
        kind, params = next(iter(item.items()))
        if kind not in RULES:
            raise RecipeError(f"{where}: rule {i}: unknown rule '{kind}'; known: {sorted(RULES)}")
        params = params or {}
        if isinstance(params, list) and kind in LIST_PARAM:
            params = {LIST_PARAM[kind]: params}
        if not isinstance(params, dict):
            raise RecipeError(f"{where}: rule {i} ({kind}): parameters must be a mapping")
        _no_unknown(f"{where}: rule {i} ({kind})", params, tuple(RULES[kind]))
        full = {**{k: v for k, v in RULES[kind].items() if v is not None}, **params}
        for (k_kind, key), allowed in CHOICES.items():
            if k_kind == kind and full.get(key) not in allowed:
                raise RecipeError(f"{where}: rule {i} ({kind}): {key} must be one of "
                                  f"{list(allowed)}, not {full.get(key)!r}")
        _check_rule(f"{where}: rule {i} ({kind})", kind, full, labels)
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}#{seen[kind]}"
        out.append(Rule(kind, name, i, full))
    return tuple(out)


def _check_rule(where: str, kind: str, p: dict[str, Any], labels: set[str]) -> None:
    def need_labels(key: str) -> None:
        names = p.get(key)
        if names is None:
            return
        if isinstance(names, str):
            names = p[key] = [names]
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise RecipeError(f"{where}: {key} {unknown} are not label columns of the recipe "
                              f"(declared under 'labels': {sorted(labels)})")

    if kind in ("duplicates", "drop_unknown"):
        need_labels("labels")
    if kind == "drop_outliers":
        if p.get("above") is None and p.get("list") is None:
            raise RecipeError(f"{where}: give 'above: SCORE' (outliers table) and/or 'list: FILE'")
        if p.get("above") is not None and not isinstance(p["above"], (int, float)):
            raise RecipeError(f"{where}: above must be a number, not {p['above']!r}")
    if kind == "relabel" and (p.get("label") not in labels or not isinstance(p.get("source"), str)):
        raise RecipeError(f"{where}: needs 'label' (one of {sorted(labels)}) and 'source'")
    if kind == "drop_quality":
        flags = p.get("flags")
        flags = p["flags"] = [flags] if isinstance(flags, str) else flags
        if not flags or not isinstance(flags, list) or not set(flags) <= set(QUALITY_FLAGS):
            bad = [f for f in flags or [] if f not in QUALITY_FLAGS] if isinstance(flags, list) else flags
            raise RecipeError(f"{where}: flags must list fingerprint quality flags, e.g. "
                              f"drop_quality: [dark, blurry]; unknown: {bad!r}; known: "
                              f"{list(QUALITY_FLAGS)}")
    if kind == "relabel_from_reviews":
        if p.get("label") is None and len(labels) == 1:
            p["label"] = next(iter(labels))
        if p.get("label") not in labels:
            raise RecipeError(f"{where}: label must name the label column the reviews are "
                              f"about (one of {sorted(labels)})")
        if p["action"] == "set" and p.get("value") is None:
            raise RecipeError(f"{where}: action 'set' needs 'value' (the label to give)")
    if kind == "resplit":
        r = p.get("ratios")
        if (not isinstance(r, dict) or not r
                or not all(isinstance(v, (int, float)) and v >= 0 for v in r.values())
                or abs(sum(r.values()) - 1) > 1e-6):
            raise RecipeError(f"{where}: ratios must map split names to shares summing to 1, "
                              f"e.g. {{train: 0.7, val: 0.1, test: 0.2}}; got {r!r}")
        if not isinstance(p.get("seed"), int):
            raise RecipeError(f"{where}: seed must be an integer")
        if p.get("stratify") is not None and p["stratify"] not in labels:
            raise RecipeError(f"{where}: stratify '{p['stratify']}' is not a label column "
                              f"({sorted(labels)})")


def _export(where: str, raw: Any, labels: set[str]) -> Export:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: 'export' must be a mapping with keys {list(EXPORT_KEYS)}")
    _no_unknown(f"{where}: export", raw, EXPORT_KEYS)
    sizes = raw.get("sizes") or []
    if not isinstance(sizes, list) or not all(isinstance(s, int) and 1 <= s <= 4096 for s in sizes):
        raise RecipeError(f"{where}: export.sizes must be a list of pixel sizes such as [28, 64]")
    npz = raw.get("npz")
    if npz is not None and npz not in labels:
        raise RecipeError(f"{where}: export.npz must name the label column of the arrays "
                          f"({sorted(labels)}), not {npz!r}")
    if npz is not None and not sizes:
        raise RecipeError(f"{where}: export.npz needs export.sizes (the .npz holds resized arrays)")
    layout = raw.get("layout", "split/label")
    if layout not in ("split/label", "split"):
        raise RecipeError(f"{where}: export.layout must be 'split/label' or 'split'")
    pack = raw.get("pack")
    if pack not in (None, False, "shards"):
        raise RecipeError(f"{where}: export.pack must be 'shards' (tar shards + index) or "
                          f"absent (plain files), not {pack!r}")
    shard_mb = raw.get("shard_mb", DEFAULT_SHARD_MB)
    if not isinstance(shard_mb, int) or isinstance(shard_mb, bool) or shard_mb < 1:
        raise RecipeError(f"{where}: export.shard_mb must be a whole number of MiB (>= 1)")
    return Export(bool(raw.get("images", True)), tuple(sorted(set(sizes))), npz, layout,
                  pack or None, shard_mb)


def resolve_path(raw: str, *, ws_root: Path, real_data: Path | None, key: str = "") -> Path:
    """A path from a recipe or params.yaml: ``real:REL`` is under the real-data folder,
    anything else under the workspace; nothing may lead outside those two roots.

    Parameters
    ----------
    key
        Where the path came from (e.g. ``leakage.pairs.ham10000``), for messages.

    Raises
    ------
    RecipeError
        When a ``real:`` path is used but no real-data folder exists, the path is absolute or
        leads (through ``..`` or a symlink) outside the workspace / real-data folder, or the
        file is missing.
    """
    where = f"{key}: " if key else ""
    if raw.startswith("real:"):
        if real_data is None:
            raise RecipeError(f"{where}'{raw}': the real-data folder is not available "
                              "(params.yaml real_data or MEDLAKE_REAL_DATA)")
        base, rel = Path(real_data), raw[5:]
    else:
        base, rel = Path(ws_root), raw
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise RecipeError(f"{where}'{raw}': absolute paths are not allowed; give a path relative "
                          "to the workspace, or 'real:PATH' under the real_data folder")
    p = (base / rel).resolve()
    root = base.resolve()
    if p != root and root not in p.parents:
        raise RecipeError(f"{where}'{raw}' leads outside the "
                          f"{'real_data folder' if raw.startswith('real:') else 'workspace'} "
                          "(via '..' or a symlink); keep inputs under the workspace or real_data")
    if not p.exists():
        raise RecipeError(f"'{raw}': file not found (looked at {p.name} under {p.parent.name}/)")
    return p
