"""Where a workspace keeps its vectors and its DVC remote: local folders or S3-compatible storage.

The LanceDB tables live in ``lake/vectors`` unless ``params.yaml`` says otherwise::

    vectors: {uri: s3://bucket/prefix}

Endpoint and credentials never come from committed files: they are read from the standard
environment variables ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``),
which LanceDB, lance-ray and DVC's S3 remote all understand. An ``http://`` endpoint (a local
SeaweedFS or MinIO) turns on plain HTTP and path-style requests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from medlake.catalog.errors import CatalogError
from medlake.catalog.vectors import VectorStore, table_name
from medlake.catalog.workspace import Workspace, run_dvc

SCHEMES = ("s3://",)


class StorageError(CatalogError):
    """A storage location or remote setting cannot be used."""


def vectors_uri(ws: Workspace) -> str:
    """The workspace's vector location: ``params.yaml: vectors.uri`` or ``lake/vectors``.

    A relative path is taken relative to the workspace root.

    Raises
    ------
    StorageError
        When the setting is not a string or names an unsupported scheme.
    """
    raw = ws.param("vectors.uri")
    if raw in (None, ""):
        return str(ws.vectors_dir)
    if not isinstance(raw, str):
        raise StorageError(f"{ws.params_file.name}: vectors.uri must be a text URI such as "
                           f"s3://bucket/prefix or a folder, not {raw!r}")
    if "://" in raw:
        if not raw.startswith(SCHEMES):
            raise StorageError(f"{ws.params_file.name}: vectors.uri '{raw}' uses an unsupported "
                               f"scheme; use one of {', '.join(SCHEMES)} or a local folder")
        return raw.rstrip("/")
    p = Path(raw)
    return str(p if p.is_absolute() else ws.root / p)


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://...``)."""
    return uri.startswith(SCHEMES)


def s3_options(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """LanceDB/Lance ``storage_options`` for S3 from the ``AWS_*`` environment variables.

    Parameters
    ----------
    env : mapping, optional
        Defaults to ``os.environ``.

    Returns
    -------
    dict
        Only the keys whose variable is set, plus ``allow_http`` and
        ``virtual_hosted_style_request = false`` for an ``http://`` endpoint.
    """
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["endpoint"] = endpoint
        out["virtual_hosted_style_request"] = "false"
        if endpoint.startswith("http://"):
            out["allow_http"] = "true"
    for key, var in (("aws_access_key_id", "AWS_ACCESS_KEY_ID"),
                     ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                     ("aws_session_token", "AWS_SESSION_TOKEN")):
        if env.get(var):
            out[key] = env[var]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        out["region"] = region or "us-east-1"
    return out


def storage_options(uri: str) -> dict[str, str] | None:
    """``storage_options`` for ``uri``: the S3 settings for ``s3://``, None for a folder."""
    return s3_options() if is_remote(uri) else None


class RemoteVectorStore(VectorStore):
    """A :class:`~catalog.vectors.VectorStore` whose LanceDB database is an object-store URI."""

    def __init__(self, uri: str, options: dict[str, str] | None = None) -> None:
        import lancedb

        self.path = PurePosixPath(uri)  # for messages (.name); LanceDB gets the URI
        self.uri = uri
        try:
            self.db = lancedb.connect(uri, storage_options=options or s3_options())
        except (OSError, ValueError, RuntimeError) as e:
            raise StorageError(f"cannot open the vector store at {uri} ({e}); check "
                               "AWS_ENDPOINT_URL and the AWS_* credentials") from e


def open_vectors(ws: Workspace) -> VectorStore:
    """The workspace's vector store (local ``lake/vectors`` or the ``vectors.uri`` bucket).

    The ``embeddings`` table (``lake/tables/embeddings/embed/<model>.parquet``) is the
    DVC-tracked record of the embed stage; a model it holds that the local store lacks (a
    fresh clone after ``dvc pull``) is loaded into the store first.
    """
    uri = vectors_uri(ws)
    if is_remote(uri):  # a shared store (e.g. the Ray engine's): its owner fills it
        return RemoteVectorStore(uri)
    vs = VectorStore(uri)
    restore_from_table(vs, ws.tables_dir / "embeddings" / "embed")
    return vs


def restore_from_table(vs: VectorStore, folder: Path) -> list[str]:
    """Load every model of the ``embeddings`` Parquet files in ``folder`` that ``vs`` lacks;
    returns the models loaded."""
    import numpy as np
    import pyarrow.parquet as pq

    done = []
    for f in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        at = pq.read_table(f)
        if at.num_rows == 0:
            continue
        model = at["model"][0].as_py()
        if vs.has(model):
            continue
        dim = len(at["vector"][0].as_py())
        mat = np.asarray(at["vector"].combine_chunks().flatten().to_numpy(),
                         dtype=np.float32).reshape(at.num_rows, dim)
        vs.add(model, at["image_id"].to_pylist(), at["sha256"].to_pylist(), mat)
        done.append(model)
    return done


def table_uri(ws: Workspace, model: str) -> str:
    """The Lance dataset URI of ``model``'s table (what lance-ray writes to)."""
    return f"{vectors_uri(ws)}/{table_name(model)}.lance"


def refuse_credentials(url: str, what: str) -> None:
    """Raise when ``url`` carries credentials (``scheme://user:secret@host``): they would be
    written into the committed ``.dvc/config`` and printed. The message does not repeat them."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise StorageError(f"{what}: not a valid URL ({e})") from None
    if parts.username or parts.password or "@" in parts.netloc:
        safe = f"{parts.scheme}://***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        raise StorageError(
            f"{what} {safe}... carries credentials; they would be committed in .dvc/config. Pass "
            "the URL without them and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or 'dvc "
            "remote modify --local NAME access_key_id ...', kept in the git-ignored "
            ".dvc/config.local)")


def configure_remote_endpoint(root: Path, endpoint_url: str) -> str:
    """Point the workspace's default S3 DVC remote at ``endpoint_url``; returns its name.

    Only the endpoint goes into the committed ``.dvc/config``; DVC reads the credentials from
    the ``AWS_*`` variables (or ``dvc remote modify --local``, which writes the ignored
    ``.dvc/config.local``).

    Raises
    ------
    StorageError
        When the default remote is not an ``s3://`` URL.
    """
    if not endpoint_url.startswith(("http://", "https://")):
        raise StorageError(f"--endpoint-url '{endpoint_url}' must start with http:// or https://")
    refuse_credentials(endpoint_url, "--endpoint-url")
    name = run_dvc(["remote", "default"], root).strip()
    url = run_dvc(["config", f"remote.{name}.url"], root).strip()
    if not url.startswith("s3://"):
        raise StorageError(f"the DVC remote '{name}' is {url}, not s3://...; an endpoint URL only "
                           "applies to S3 remotes (pass --remote s3://bucket/path)")
    run_dvc(["remote", "modify", name, "endpointurl", endpoint_url], root)
    return name

