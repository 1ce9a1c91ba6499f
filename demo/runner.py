"""The demo: fill the reference workspace offline and show what medlake found.

1. generate the synthetic image dataset into ``data/synthetic`` (byte-identical on every
   machine, so the committed ``data.dvc`` stays valid);
2. ``dvc repro``: every stage of ``dvc.yaml`` (ingest first; later stages add theirs);
3. ``dvc push`` to the workspace's DVC remote (``medlake init`` sets a local one), so the
   corrected versions can be pulled from a clone once ``dvc.lock`` is committed;
4. print each dataset's profile, a sample SQL query and what to run next.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from medlake.catalog import Catalog, render, run_dvc

SAMPLE_SQL = """\
SELECT s.source_id, s.kind, s.negatives, count(DISTINCT a.image_id) AS images,
       count(*) FILTER (WHERE a.value > 0) AS positive_labels
FROM sources s JOIN annotations a USING (source_id)
GROUP BY ALL ORDER BY images DESC LIMIT 8"""

NEXT_STEPS = """\
next:
  .venv/bin/medlake sql "SELECT * FROM sources"          SQL over every table
  .venv/bin/medlake profile synth-derm                   one dataset's profile
  .venv/bin/medlake ingest --list                        formats you can ingest
  .venv/bin/dvc status                                   the pipeline is up to date"""

DEMO_CAPTURES = 300  # about 450 images in both modalities, generated in a few seconds


def env_with_venv() -> dict[str, str]:
    """The environment for subprocesses, with this interpreter's bin folder first on PATH
    (so ``dvc.yaml``'s ``medlake ...`` commands run the same installation)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def generate_data(catalog: Catalog, *, echo: Callable[[str], None] = print) -> Path:
    """Write the synthetic demo images under ``data/synthetic`` (idempotent, deterministic)."""
    from medlake.demo import synthetic

    out = catalog.ws.data_dir / "synthetic"
    summary = synthetic.generate(out, n_captures=DEMO_CAPTURES, seed=0, overwrite=True)
    echo(summary.text())
    return out


def push(catalog: Catalog) -> str:
    """``dvc push`` every stage output (the versions included) to the default remote.

    Returns a one-line message; a workspace without a remote is told how to add one.
    """
    root = catalog.ws.root
    if not run_dvc(["remote", "list"], root, env=env_with_venv()).strip():
        return ("dvc push skipped: no DVC remote (add one: dvc remote add -d local "
                "../medlake-dvc-remote)")
    out = run_dvc(["push"], root, env=env_with_venv())
    last = [ln for ln in out.splitlines() if ln.strip()]
    return "dvc push: " + (last[-1].strip() if last else "done") + (
        "\n(commit dvc.lock so that a clone can 'dvc pull' these versions)")


def run(catalog: Catalog, *, repro: bool = True, echo: Callable[[str], None] = print) -> None:
    """Run the demo in ``catalog``'s workspace (see the module docstring)."""
    generate_data(catalog, echo=echo)
    if repro:
        echo("dvc repro ...")
        out = run_dvc(["repro"], catalog.ws.root, env=env_with_venv())
        echo("\n".join(ln for ln in out.splitlines() if ln.strip())[-3000:])
        echo(push(catalog))
    from medlake.catalog.profile import profile

    for ds in catalog.dataset_ids():
        echo("\n" + profile(catalog, ds, max_findings=6).render())
    echo("\nsample query:\n" + SAMPLE_SQL + "\n")
    echo(render(catalog.sql(SAMPLE_SQL)))
    echo("\n" + NEXT_STEPS)


def free_port(host: str = "127.0.0.1", preferred: int = 8501) -> int:
    """``preferred`` when nothing listens there, else a free port the system picks."""
    import socket

    for want in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, want))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")  # pragma: no cover - bind(0) does not fail


def launch_ui(catalog: Catalog, *, port: int | None = None, host: str = "127.0.0.1") -> int:
    """The demo's last step: serve the UI on the workspace (``medlake ui``) until Ctrl+C.

    ``medlake ui`` prints the URL once the server answers; the port is 8501 when free,
    else any free one. Returns the server's exit code. ``MEDLAKE_NO_UI=1`` (checked by
    ``medlake demo``) skips this step.
    """
    import subprocess

    medlake = Path(sys.executable).parent / "medlake"
    cmd = [str(medlake), "ui", str(catalog.ws.root), "--port", str(port or free_port(host)),
           "--host", host]
    try:
        return subprocess.call(cmd, env=env_with_venv())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("demo")
