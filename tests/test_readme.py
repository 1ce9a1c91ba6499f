"""The README cannot rot: its commands exist, its set-up is the Makefile's, CI runs it."""

from __future__ import annotations

import re

from click.testing import CliRunner

from medlake.cli.main import main
from conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_command_named_in_readme_exists_in_help():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    listed = set(re.findall(r"^  ([a-z][a-z0-9-]*)\s", res.output, flags=re.M))
    named = set(re.findall(r"medlake ([a-z][a-z0-9-]+)", README))
    assert named, "README names no medlake command"
    missing = named - listed
    assert not missing, f"README names commands that medlake --help does not list: {missing}"


def test_every_command_is_documented_in_readme():
    undocumented = {n for n in main.commands if f"medlake {n}" not in README}
    assert not undocumented, f"commands missing from the README: {undocumented}"


def test_two_setup_commands_match_makefile_and_ci():
    assert "make demo" in README and "make test" in README
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_names_no_machine_paths():
    assert not re.search(r"(?<![.\w])/(work|tmp|root|home)/", README)
