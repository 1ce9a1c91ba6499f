"""Every stage's declaration, and what is derived from them.

:data:`ORDER` is the pipeline order (a stage only depends on earlier ones). From the
declarations come: the ``medlake <stage>`` commands (:mod:`medlake.cli.stages`), the
``dvc.yaml`` of a workspace (:mod:`medlake.pipelines.workspace_pipeline`), the default
``params.yaml`` (:func:`default_params_yaml`), the whole-file check of ``params.yaml``
(:func:`validate`), the UI's hints (:func:`hints`) and the stage table in
docs/ARCHITECTURE.md (:func:`docs_table`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any

from medlake.catalog import Workspace
from medlake.catalog.params import ParamsError, describe, load, param, to_dict
from medlake.pipelines.stage import Stage

ORDER = ("ingest", "fingerprint", "embed", "duplicates", "outliers", "leakage", "agreement",
         "materialize")


@dataclass(frozen=True)
class Vectors:
    """``params.yaml: vectors``: where LanceDB keeps the working vector store."""

    uri: str = param("lake/vectors", "a folder under the workspace or s3://bucket/prefix")


@dataclass(frozen=True)
class WorkspaceParams:
    """Top-level keys of ``params.yaml`` that are not a stage's block."""

    real_data: str = param("../shared/data", "folder of public metadata files ('real:' paths); "
                           "relative to the workspace")
    vectors: Vectors = param(factory=Vectors, help="vector store location")
    medlake_version: str | None = param(None, "the installed medlake version the pipeline ran "
                                        "with (written by medlake in a user's workspace)")


@cache
def stages() -> dict[str, Stage]:
    """``{name: Stage}`` in pipeline order (imports every stage module)."""
    out = {}
    for name in ORDER:
        mod = importlib.import_module(f"medlake.pipelines.{name}")
        decl: Stage = mod.DECLARATION
        if decl.name != name:  # pragma: no cover - a declaration error
            raise RuntimeError(f"pipelines/{name}.py declares stage '{decl.name}'")
        out[name] = Stage(**{**decl.__dict__, "module": mod.__name__})
    return out


def validate(ws: Workspace) -> dict[str, Any]:
    """Check every block of the workspace's ``params.yaml``; return the validated instances.

    Raises
    ------
    ParamsError
        Naming the file and key for an unknown top-level key, an unknown key inside a block,
        a wrong type or an out-of-range value.
    """
    raw = ws.params()
    file = ws.params_file.name
    st = stages()
    top = {f.name for f in WorkspaceParams.__dataclass_fields__.values()}
    unknown = [k for k in raw if k not in st and k not in top]
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), [*st, *top], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamsError(f"{file}: {unknown[0]}: unknown key{hint}; allowed top-level keys: "
                          f"{', '.join([*top, *st])}")
    out: dict[str, Any] = {"": load(WorkspaceParams, {k: raw[k] for k in top if k in raw},
                                    file=file)}
    for name, s in st.items():
        if s.check_block is not None:  # a block with keys validated by their own modules
            out[name] = s.check_block(raw.get(name), file=file)
        elif s.params is not None:
            out[name] = load(s.params, s.wrap(raw.get(name)), file=file, key=name)
    return out


def default_params() -> dict[str, Any]:
    """The default ``params.yaml`` content as plain values (what ``medlake init`` writes)."""
    out: dict[str, Any] = {"real_data": WorkspaceParams().real_data}
    for name, s in stages().items():
        if s.params is not None:
            out[name] = s.unwrap(s.params())
    return out


def default_params_yaml() -> str:
    """``params.yaml`` with every block's defaults and one comment line per key."""
    import yaml

    lines = ["# medlake workspace settings: one block per stage (defaults shown).",
             "# 'medlake <stage> --help' and docs/ARCHITECTURE.md describe each key.", ""]
    lines += [f"# {WorkspaceParams.__dataclass_fields__['real_data'].metadata['help']}",
              yaml.safe_dump({"real_data": WorkspaceParams().real_data}).strip(), ""]
    for name, s in stages().items():
        if s.params is None:
            continue
        lines.append(f"# stage {name}: {s.help.splitlines()[0]}")
        for fname, tp, _default, helptext in describe(s.params):
            lines.append(f"#   {fname}: {helptext} ({tp})")
        block = yaml.safe_dump({name: s.unwrap(s.params())}, sort_keys=False,
                               default_flow_style=None, width=100).strip()
        lines += [block, ""]
    return "\n".join(lines)


def writers() -> dict[str, list[str]]:
    """``{table: [stage, ...]}`` in pipeline order."""
    out: dict[str, list[str]] = {}
    for name, s in stages().items():
        for t in s.writes:
            out.setdefault(t, []).append(name)
    return out


def _command(name: str) -> str:
    s = stages()[name]
    return "medlake ingest FORMAT PATH" if name == "ingest" else (
        f"medlake {name} RECIPE" if s.foreach else f"medlake {name}")


def upstream(name: str) -> list[str]:
    """The stages ``name`` needs, in pipeline order, ending with ``name`` itself."""
    st = stages()
    need, todo = {name}, [name]
    while todo:
        s = st[todo.pop()]
        pos = ORDER.index(s.name)
        for t in s.reads:
            for w in ORDER[:pos]:
                if t in st[w].writes and not st[w].foreach and w not in need:
                    need.add(w)
                    todo.append(w)
    return [n for n in ORDER if n in need]


def hints() -> dict[str, str]:
    """``{table: what to run}`` for pages and errors whose table is missing, e.g.
    ``pairs``: ``medlake fingerprint, medlake embed, then medlake duplicates`` (ingest,
    which every chain starts with, is named only for the tables it writes)."""
    out = {}
    for t, ws in writers().items():  # the first writer creates the table
        cmds = [_command(n) for n in upstream(ws[0]) if n != "ingest" or ws[0] == "ingest"]
        out[t] = cmds[0] if len(cmds) == 1 else ", ".join(cmds[:-1]) + ", then " + cmds[-1]
    return out


def docs_table() -> str:
    """The stage table of docs/ARCHITECTURE.md (between its ``stages:begin/end`` markers)."""
    rows = ["| stage | command | params block | reads | writes |", "|---|---|---|---|---|"]
    for name, s in stages().items():
        cmd = f"`medlake {name}" + (" RECIPE" if s.foreach else "") + (
            f" {s.dvc_args}" if s.dvc_args else "") + "`"
        keys = ", ".join(f"`{f}`" for f, *_ in describe(s.params)) if s.params else "—"
        rows.append(f"| `{name}` | {cmd} | {keys} | {', '.join(s.reads) or '—'} | "
                    f"{', '.join(s.writes)} |")
    return "\n".join(rows)


def params_doc() -> str:
    """Every params key with its type, default and meaning (docs/ARCHITECTURE.md)."""
    import json

    out = []
    for name, s in [("(top level)", None), *stages().items()]:
        cls = WorkspaceParams if s is None else s.params
        if cls is None:
            continue
        out.append(f"**{name}**" + (" (a list of entries)" if s is not None and s.list_field
                                     else ""))
        for fname, tp, default, helptext in describe(cls):
            out.append(f"- `{fname}` ({tp}; default `{json.dumps(default)}`): {helptext}")
        out.append("")
    return "\n".join(out).strip()


__all__ = ["ORDER", "ParamsError", "WorkspaceParams", "default_params", "default_params_yaml",
           "docs_table", "hints", "params_doc", "stages", "to_dict", "validate", "writers"]


def write_docs(path: str = "docs/ARCHITECTURE.md") -> bool:
    """Refresh the generated tables of docs/ARCHITECTURE.md (``make docs``); True if changed."""
    from pathlib import Path

    p = Path(path)
    text = old = p.read_text()
    for a, b, body in (("<!-- stages:begin -->", "<!-- stages:end -->", docs_table()),
                       ("<!-- params:begin -->", "<!-- params:end -->", params_doc())):
        pre, rest = text.split(a, 1)
        _, post = rest.split(b, 1)
        text = pre + a + "\n" + body + "\n" + b + post
    if text != old:
        p.write_text(text)
    return text != old


if __name__ == "__main__":  # pragma: no cover
    print("docs/ARCHITECTURE.md", "updated" if write_docs() else "current")
