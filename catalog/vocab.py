"""The shared findings vocabulary and its workspace overrides (``findings.yaml``).

Every source keeps its own finding names in ``annotations``; the ``findings`` table maps each
(source, finding) to a shared name so sources can be compared. The default mapping is
``normalise(name)`` (lower case, words joined by ``_``) followed by :data:`SYNONYMS`;
``findings.yaml`` in the workspace can add synonyms or map one source's finding directly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from medlake.catalog.errors import WorkspaceError

SYNONYMS: dict[str, str] = {
    # chest X-ray
    "effusion": "pleural_effusion",
    "pleural_thickening": "pleural_thickening",
    "no_finding": "no_finding",
    "normal": "no_finding",
    "infiltration": "infiltration",
    "infiltrates": "infiltration",
    "infiltrate": "infiltration",  # NIH bounding boxes
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "cardiomegaly": "cardiomegaly",
    "atelectasis": "atelectasis",
    "emphysema": "emphysema",
    "fibrosis": "fibrosis",
    "pulmonary_fibrosis": "fibrosis",
    "hernia": "hernia",
    "hiatal_hernia": "hernia",
    "pneumonia": "pneumonia",
    "lung_opacity": "lung_opacity",
    "airspace_opacity": "airspace_opacity",
    "nodule_or_mass": "nodule_or_mass",
    "nodule_mass": "nodule_or_mass",  # VinDr-CXR "Nodule/Mass"
    "fracture": "fracture",
    "edema": "edema",
    "pulmonary_edema": "edema",
    # support devices / tubes (PadChest labels and the purrlab tube annotations)
    "chest_drain": "chest_drain",
    "chest_drain_tube": "chest_drain",
    "nsg_tube": "nsg_tube",
    "endotracheal_tube": "endotracheal_tube",
    "tracheostomy_tube": "tracheostomy_tube",
    # dermatology
    "fitzpatrick_scale": "skin_type",
    "fitzpatrick_centaur": "skin_type",
    "fitzpatrick": "skin_type",
    "dx": "diagnosis",
    "label": "diagnosis",
}


def normalise(name: str) -> str:
    """``'Pleural Effusion'`` -> ``'pleural_effusion'``."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def load_overrides(path: Path) -> dict[str, Any]:
    """Read ``findings.yaml``: ``{'synonyms': {...}, 'sources': {source_id: {finding: shared}}}``."""
    if not path.exists():
        return {"synonyms": {}, "sources": {}}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WorkspaceError(f"{path.name}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise WorkspaceError(f"{path.name}: expected keys 'synonyms' and 'sources' at the top level")
    syn = data.get("synonyms") or {}
    src = data.get("sources") or {}
    if not isinstance(syn, dict) or not isinstance(src, dict):
        raise WorkspaceError(f"{path.name}: 'synonyms' and 'sources' must be mappings")
    return {"synonyms": {normalise(str(k)): str(v) for k, v in syn.items()}, "sources": src}


def shared_name(source_id: str, finding: str, overrides: dict[str, Any] | None = None) -> str:
    """The shared-vocabulary name of ``finding`` as labelled by ``source_id``."""
    ov = overrides or {"synonyms": {}, "sources": {}}
    direct = (ov["sources"].get(source_id) or {}).get(finding)
    if direct:
        return str(direct)
    n = normalise(finding)
    return ov["synonyms"].get(n) or SYNONYMS.get(n) or n


def default_findings_yaml() -> str:
    return (
        "# Shared findings vocabulary for this workspace (read by 'medlake ingest').\n"
        "# Each source's own finding names are normalised (lower case, '_' between words)\n"
        "# and then mapped through medlake's built-in synonyms and the entries below.\n"
        "#\n"
        "# synonyms:            normalised name -> shared name, for every source\n"
        "#   pleural_effusion: effusion\n"
        "# sources:             one source's finding -> shared name\n"
        "#   padchest:report_nlp:\n"
        "#     chest drain tube: chest_drain\n"
        "synonyms: {}\n"
        "sources: {}\n"
    )
