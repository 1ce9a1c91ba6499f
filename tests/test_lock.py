"""``requirements.lock``: every dependency of pyproject.toml pinned with hashes, and installed.

``make demo`` and ``make test`` install ``pip install --require-hashes -r requirements.lock``
then ``pip install --no-deps -e .``; ``make lock`` refreshes the lock from pyproject.toml.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
EXTRAS = ("dev", "scale")
REFRESH = ("uv pip compile pyproject.toml --extra dev --extra scale --generate-hashes "
           "--python-version 3.11 -o requirements.lock")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """Package (canonical name) -> (exact version, sha256 hashes) from a pip lock file."""
    out: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            name = canonicalize_name(m.group(1))
            assert name not in out, f"{path.name}: {name} pinned twice"
            out[name] = (m.group(3), [])
        elif name is not None and line.startswith((" ", "\t")):
            out[name][1].extend(HASH.findall(line))
        elif line.strip() and not line.startswith("#"):
            raise AssertionError(f"{path.name}: unexpected line {line!r}")
    return out


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies: core and the dev and scale extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.fixture(scope="module")
def lock() -> dict[str, tuple[str, list[str]]]:
    if not LOCK.is_file():
        pytest.fail(f"no {LOCK.name} at the repository root: run `make lock`")
    return read_lock()


def test_lock_is_made_from_pyproject_with_hashes(lock):
    head = LOCK.read_text()[:600]
    assert REFRESH in " ".join(head.replace("#", " ").split()), head
    assert lock
    unhashed = sorted(n for n, (_, hashes) in lock.items() if not hashes)
    assert not unhashed, f"pinned without a hash (pip --require-hashes refuses): {unhashed}"


def test_every_dependency_is_pinned_exactly(lock):
    problems = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name not in lock:
            problems.append(f"{req}: not in the lock")
            continue
        version, hashes = lock[name]
        if not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req}: the lock has {version}")
        if not hashes:
            problems.append(f"{req}: no hash")
    assert not problems, (f"requirements.lock is out of date with pyproject.toml; run `make "
                          f"lock` ({REFRESH}): " + "; ".join(problems))


def test_pinned_versions_that_matter(lock):
    """OpenCV stays on 4.x (development and every recorded figure used it; 5.x arrived with an
    unpinned install); torch and torchvision exactly as pyproject pins them."""
    assert Version(lock["opencv-python-headless"][0]).major == 4, lock["opencv-python-headless"]
    assert lock["torch"][0] == "2.14.1" and lock["torchvision"][0] == "0.29.1"


def test_installed_versions_equal_the_lock(lock):
    wrong = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name not in lock:
            continue  # reported by test_every_dependency_is_pinned_exactly
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        want = lock[name][0]
        if have is None or Version(have).public != Version(want).public:
            wrong.append(f"{name}: installed {have}, lock {want}")
    assert not wrong, ("this environment differs from requirements.lock; run `make install` "
                       "(pip install --require-hashes -r requirements.lock): " + "; ".join(wrong))


def test_datasheet_records_the_lock(monkeypatch):
    from medlake import __version__
    from medlake.pipelines.datasheet import environment

    monkeypatch.delenv("MEDLAKE_LOCK", raising=False)
    env = environment()
    assert env == {"medlake_version": __version__,
                   "lock_sha256": hashlib.sha256(LOCK.read_bytes()).hexdigest()}


def test_read_lock_parses_pins_and_hashes(tmp_path):
    p = tmp_path / "x.lock"
    p.write_text("# header\nray[data]==2.60.0 \\\n    --hash=sha256:" + "a" * 64 + " \\\n"
                 "    --hash=sha256:" + "b" * 64 + "\n    # via x\nZope.Interface==7.0 \\\n"
                 "    --hash=sha256:" + "c" * 64 + "\n")
    assert read_lock(p) == {"ray": ("2.60.0", ["a" * 64, "b" * 64]),
                            "zope-interface": ("7.0", ["c" * 64])}
