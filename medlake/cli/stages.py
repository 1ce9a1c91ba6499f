"""The ``medlake <stage>`` commands, built from the stage declarations.

For each :class:`medlake.pipelines.stage.Stage`: the command's name and help, its own options
(``Stage.options``), one ``--key`` option per scalar key of its params block (overriding
``params.yaml`` for this run, validated like the file), ``--workspace``, and a body that
opens the workspace, checks ``params.yaml``, calls ``run(catalog, params, **options)`` and
prints ``result.summary()``.
"""

from __future__ import annotations

import inspect
from typing import Any

import click

from medlake.cli.common import command, open_catalog, workspace_option


def _param_options(stage: Any, taken: set[str]) -> list[tuple[str, Any]]:
    from medlake.catalog.params import scalar_fields

    out = []
    if stage.params is None:
        return out
    for f, tp in scalar_fields(stage.params):
        if not f.metadata.get("cli", True) or f.name in taken:
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata.get('help', '')} (params.yaml {stage.name}.{f.name})"
        if tp is bool:
            opt = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f"p_{f.name}",
                               default=None, help=helptext)
        else:
            from typing import Literal, get_args, get_origin

            ctype = (click.Choice([str(a) for a in get_args(tp)]) if get_origin(tp) is Literal
                     else {int: int, float: float, str: str}[tp])
            opt = click.option(flag, f"p_{f.name}", type=ctype, default=None, help=helptext)
        out.append((f.name, opt))
    return out


def make_command(stage: Any) -> click.Command:
    """The click command of ``stage``."""
    own = set()
    for opt in stage.options:  # names the stage's own options use
        probe = opt(lambda **kw: None)
        own |= {p.name for p in getattr(probe, "__click_params__", [])}
    params = _param_options(stage, own)
    accepts = set(inspect.signature(stage.run).parameters)

    def body(**kw: Any) -> None:
        workspace = kw.pop("workspace")
        overrides = {name: kw.pop(f"p_{name}") for name, _ in params}
        cat = open_catalog(workspace)
        from medlake.pipelines.registry import validate

        validate(cat.ws)
        prm = stage.load_params(cat, None, overrides)
        if "echo" in accepts:
            kw["echo"] = click.echo
        from medlake.pipelines.stage import UsageProblem

        try:
            res = stage.run(cat, prm, **kw)
        except UsageProblem as e:
            raise click.UsageError(str(e)) from None
        if not kw.get("list_"):
            stage.ensure_outputs(cat)  # every declared output exists for DVC
        text = res.summary()
        if text:
            click.echo(text)

    doc = stage.help + (f"\n\n\b\nExample:\n  {stage.example}" if stage.example else "")
    f: Any = command(body)
    f = workspace_option(f)
    for _, opt in reversed(params):
        f = opt(f)
    for opt in reversed(stage.options):
        f = opt(f)
    return click.command(stage.name, help=doc)(f)


def commands() -> list[click.Command]:
    """One command per declared stage."""
    from medlake.pipelines.registry import stages

    return [make_command(s) for s in stages().values()]
