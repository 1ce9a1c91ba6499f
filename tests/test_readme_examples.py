"""The README's worked examples are executed against the workspace they name (this
repository's demo workspace, after ``make demo``) and their printed output is compared.

Every ``$ .venv/bin/medlake sql "..."`` example in a README code block is run and its output
must equal the block's lines (a block that ends with ``...`` is compared up to there). Other
commands are checked to parse (``--help`` of the command exists). The demo's lake is not part
of a fresh clone: without it the comparison is skipped with the reason, and
``python tests/test_readme_examples.py`` (after ``make demo``) prints any difference.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from medlake.cli.main import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def examples(text: str) -> list[tuple[list[str], list[str]]]:
    """``(argv, expected output lines)`` of each ``$ .venv/bin/medlake ...`` example."""
    out = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ .venv/bin/medlake "):
                i += 1
                continue
            cmd = lines[i][2:]
            while cmd.count('"') % 2:  # a quoted query over several lines
                i += 1
                cmd += "\n" + lines[i]
            i += 1
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i].rstrip())
                i += 1
            out.append((shlex.split(cmd)[1:], expected))
    return out


def run_example(argv: list[str]) -> tuple[list[str], float]:
    t = time.perf_counter()
    r = CliRunner().invoke(main, [*argv, "--workspace", str(REPO)])
    dt = time.perf_counter() - t
    assert r.exit_code == 0, f"{' '.join(argv)[:200]}:\n{r.output[-2000:]}"
    return [ln.rstrip() for ln in r.output.splitlines()], dt


def compare(argv: list[str], expected: list[str], got: list[str]) -> str | None:
    want = expected[:expected.index("...")] if "..." in expected else expected
    have = got[:len(want)] if "..." in expected else got
    if have != want:
        return (f"{' '.join(argv)[:120]}...\nREADME:\n" + "\n".join(want) +
                "\nnow:\n" + "\n".join(have))
    return None


EXAMPLES = examples(README.read_text())
HAVE_DEMO = (REPO / "lake/tables/images").is_dir() and (REPO / "lake/tables/agreement").is_dir()


def test_readme_has_sql_examples_that_parse() -> None:
    sql = [a for a, _ in EXAMPLES if a[0] == "sql"]
    assert len(sql) >= 3
    for argv, _ in EXAMPLES:
        assert argv[0] in main.commands, argv[0]


@pytest.mark.skipif(not HAVE_DEMO, reason="the demo workspace's lake is absent (run 'make demo')")
@pytest.mark.parametrize("n", range(len([a for a, _ in EXAMPLES if a[0] == "sql"])))
def test_readme_sql_example_output_is_current(n: int) -> None:
    argv, expected = [(a, e) for a, e in EXAMPLES if a[0] == "sql"][n]
    got, _ = run_example(argv)
    problem = compare(argv, expected, got)
    assert problem is None, problem


if __name__ == "__main__":  # after 'make demo': print what differs and each query's seconds
    bad = 0
    for argv, expected in EXAMPLES:
        if argv[0] != "sql":
            continue
        got, dt = run_example(argv)
        problem = compare(argv, expected, got)
        print(f"{dt:6.2f} s  {'OK ' if problem is None else 'DIFF'}  {argv[1][:70]!r}")
        if problem:
            bad += 1
            print(problem)
    raise SystemExit(1 if bad else 0)
