"""``medlake``: the click group.

The stage commands (``medlake ingest``, ``fingerprint``, ... ``materialize``) are built from
the stage declarations (:mod:`medlake.cli.stages`). Each module in ``cli/commands/`` adds the
other commands and lists them in ``COMMANDS``; it imports ``pipelines`` lazily inside the
command body.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from medlake import __version__
from medlake.cli import commands as _commands_pkg
from medlake.cli.common import setup_logging


def _load_commands() -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for mod in sorted(pkgutil.iter_modules(_commands_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"medlake.cli.commands.{mod.name}")
        for cmd in getattr(module, "COMMANDS", []):
            found[cmd.name] = cmd
    return found


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="medlake")
@click.option("--verbose", "-v", is_flag=True, help="Show debug logs and full tracebacks.")
def main(verbose: bool) -> None:
    """medlake: versioned catalog, audits and corrected versions of medical image datasets."""
    setup_logging(verbose)


def _stage_commands() -> dict[str, click.Command]:
    from medlake.cli.stages import commands

    return {c.name: c for c in commands()}


for _cmd in {**_load_commands(), **_stage_commands()}.values():
    main.add_command(_cmd)


def run_stage(name: str, argv: list[str] | None = None) -> None:
    """``python -m medlake.pipelines.<name> ARGS`` == ``medlake <name> ARGS``."""
    main.main(args=[name, *(sys.argv[1:] if argv is None else argv)], prog_name="medlake")


if __name__ == "__main__":  # pragma: no cover
    main()
