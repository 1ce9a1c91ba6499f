"""Shared fixtures: real engines in tmp_path, real public metadata from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medlake.catalog import Catalog, Workspace

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    raw = os.environ.get("MEDLAKE_REAL_DATA")
    p = Path(raw) if raw else REPO.parent / "shared" / "data"
    return p.resolve() if p.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public metadata folder (../shared/data); tests that need it skip when absent."""
    p = _shared_data()
    if p is None:
        pytest.skip("real public metadata not found at ../shared/data (set MEDLAKE_REAL_DATA)")
    return p


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    """A bare lake in tmp_path (a .dvc/ folder, no git): fast, for table-level tests."""
    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    return Catalog(Workspace(root.resolve()))


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A real workspace made by ``medlake init``: git + DVC + a local directory remote."""
    return Workspace.init(tmp_path / "ws")
