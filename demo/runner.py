"""The demo: fill the reference workspace offline and show what medlake found.

1. generate the synthetic image dataset into ``data/synthetic`` (byte-identical on every
   machine, so the committed ``data.dvc`` stays valid);
2. ``dvc repro``: every stage of the generated ``dvc.yaml``; its whole log goes to
   ``lake/demo.log``;
3. ``dvc push`` to the workspace's DVC remote, so the corrected versions can be pulled from a
   clone once ``dvc.lock`` is committed;
4. ``medlake report`` into ``lake/report/``;
5. print one screen: one line of findings per dataset, where the log and the report are, and
   the next three commands (``--verbose``: each dataset's full profile and a sample query).
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
  .venv/bin/medlake sql "SELECT * FROM discrepancies LIMIT 20"   label disagreements, per image
  .venv/bin/medlake profile ham10000                               one dataset in full
  .venv/bin/dvc pull lake/versions/ham10000-corrected             (in a clone) a corrected version"""

DEMO_CAPTURES = 300  # about 450 images in both modalities, generated in a few seconds


def env_with_venv() -> dict[str, str]:
    """The environment for subprocesses, with this interpreter's bin folder first on PATH
    (so ``dvc.yaml``'s ``medlake ...`` commands run the same installation)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def generate_data(catalog: Catalog, *, echo: Callable[[str], None] = print) -> str:
    """Write the synthetic demo images under ``data/synthetic`` (idempotent, deterministic);
    returns a one-line summary."""
    from medlake.demo import synthetic

    out = catalog.ws.data_dir / "synthetic"
    summary = synthetic.generate(out, n_captures=DEMO_CAPTURES, seed=0, overwrite=True)
    echo(summary.text())
    first = summary.text().splitlines()[0]
    return first.replace(str(out), catalog.ws.relpath(out))


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


def run(catalog: Catalog, *, repro: bool = True, verbose: bool = False,
        echo: Callable[[str], None] = print) -> None:
    """Run the demo in ``catalog``'s workspace (see the module docstring)."""
    summary = generate_data(catalog, echo=echo if verbose else (lambda s: None))
    echo(f"medlake demo: {summary}")
    log = catalog.ws.lake / "demo.log"
    if repro:
        echo("dvc repro ... (every stage; the whole log goes to lake/demo.log)")
        out = run_dvc(["repro"], catalog.ws.root, env=env_with_venv())
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
        if verbose:
            echo(out.rstrip())
        echo(push(catalog).splitlines()[0])
    echo("")
    echo("what it found:")
    for line in findings(catalog):
        echo("  " + line)
    try:
        from medlake.pipelines import report

        res = report.run(catalog, out=catalog.ws.lake / "report")
        echo(f"\nreport: {catalog.ws.relpath(res.html)} (and report.md; opens offline)")
    except Exception as e:  # noqa: BLE001 - the demo goes on without its report
        echo(f"\nreport: not written ({e})")
    if verbose:
        from medlake.catalog.profile import profile

        for ds in catalog.dataset_ids():
            echo("\n" + profile(catalog, ds, max_findings=6).render())
        echo("\nsample query:\n" + SAMPLE_SQL + "\n")
        echo(render(catalog.sql(SAMPLE_SQL)))
    echo("\n" + NEXT_STEPS)


def findings(catalog: Catalog) -> list[str]:
    """One line per dataset: images, leaking groups, duplicate clusters, the two sources that
    agree least, and the corrected versions built from it."""
    import json

    def q(sql: str) -> list[dict]:
        try:
            return catalog.query(sql).to_dicts()
        except Exception:  # noqa: BLE001 - a table a stage did not write: nothing to say
            return []

    imgs = {r["dataset_id"]: r["n"] for r in q(
        "SELECT dataset_id, count(*) AS n FROM images GROUP BY 1")}
    leak = {}
    for r in q("SELECT dataset_id, scheme, n_groups, n_groups_total FROM leakage "
               "WHERE split_a = '*' AND grouping = 'group_id+duplicates' ORDER BY 1, 2"):
        if r["n_groups"]:
            leak.setdefault(r["dataset_id"], f"{r['n_groups']:,} of {r['n_groups_total']:,} "
                            f"groups leak across {r['scheme']} splits")
    dup = {}
    for r in q("SELECT datasets, count(DISTINCT cluster_id) AS n FROM clusters GROUP BY 1"):
        for ds in str(r["datasets"]).split(","):
            dup[ds] = dup.get(ds, 0) + r["n"]
    worst = {}
    for r in q("SELECT dataset_id, finding, source_a, annotator_a, source_b, annotator_b, "
               "kappa, n_shared FROM agreement WHERE subgroup = '' AND kappa IS NOT NULL "
               "AND n_shared >= 50 ORDER BY dataset_id, kappa"):
        if r["dataset_id"] not in worst:
            a = r["source_a"].split(":", 1)[-1] + (f"/{r['annotator_a']}" if r["annotator_a"] else "")
            b = r["source_b"].split(":", 1)[-1] + (f"/{r['annotator_b']}" if r["annotator_b"] else "")
            worst[r["dataset_id"]] = (f"lowest kappa {r['kappa']:.2f} ({a} vs {b} on "
                                      f"{r['finding']}, n {r['n_shared']:,})")
    vers: dict[str, list[str]] = {}
    for r in q("SELECT name, dataset_id, counts FROM versions WHERE kind = 'derived' ORDER BY 1"):
        split = (json.loads(r["counts"] or "{}") or {}).get("split") or {}
        parts = "/".join(f"{split[s]:,}" for s in ("train", "val", "test") if s in split)
        vers.setdefault(r["dataset_id"], []).append(f"version {r['name']} {parts}".strip())
    out = []
    for ds in sorted(imgs):
        bits = [f"{imgs[ds]:,} images"]
        bits += [leak[ds]] if ds in leak else []
        bits += [f"{dup[ds]:,} duplicate clusters"] if dup.get(ds) else []
        bits += [worst[ds]] if ds in worst else []
        bits += vers.get(ds, [])
        out.append(f"{ds}: " + "; ".join(bits))
    return out


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
    cmd = [str(medlake), "ui", "--workspace", str(catalog.ws.root), "--port", str(port or free_port(host)),
           "--host", host]
    try:
        return subprocess.call(cmd, env=env_with_venv())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("demo")
