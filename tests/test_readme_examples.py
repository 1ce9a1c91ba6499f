"""The README's worked examples are executed against the workspace they name (this
repository's demo workspace, after ``make demo``) and their printed output is compared.

Every ``$ .venv/bin/medlake ...`` example in a README code block runs, in the README's order,
in a copy of the demo workspace (its ``params.yaml``, recipes and ``lake/tables``; commands
that write, such as ``ingest`` or ``agreement``, change the copy, never the demo), and its
output must equal the block's lines (a block that ends with ``...`` is compared up to there;
durations such as ``(0.21 s)`` are compared as numbers of seconds, not their values). The
demo's lake is not part of a fresh clone: without it the comparison is skipped with the
reason, and ``python tests/test_readme_examples.py`` (after ``make demo``) prints any
difference and each example's seconds.
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medlake.cli.main import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PROMPT = "$ .venv/bin/medlake "
_SECONDS = re.compile(r"\d+(\.\d+)? s\b")


def examples(text: str) -> list[tuple[list[str], list[str]]]:
    """``(argv, expected output lines)`` of each ``$ .venv/bin/medlake ...`` example."""
    out, blocks, block, fenced = [], [], [], False
    for line in text.splitlines():  # plain fenced blocks (a ```yaml block is not an example)
        if line.startswith("```"):
            if fenced and block is not None:
                blocks.append(block)
            block, fenced = ([] if line == "```" else None), not fenced
        elif fenced and block is not None:
            block.append(line)
    for lines in blocks:
        i = 0
        while i < len(lines):
            if not lines[i].startswith(PROMPT):
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


def demo_copy(dest: Path) -> Path:
    """A workspace at ``dest`` holding the demo's params.yaml, recipes and lake tables.

    ``real_data`` is pointed at the demo's own public-metadata folder, so the copy reads the
    same files from wherever it lies.
    """
    (dest / ".dvc").mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["real_data"] = str((REPO / params.get("real_data", "../shared/data")).resolve())
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / "recipes", dest / "recipes")
    shutil.copytree(REPO / "lake" / "tables", dest / "lake" / "tables",
                    ignore=shutil.ignore_patterns(".journal", ".*.tmp*", ".*.old-*"))
    r = CliRunner().invoke(main, ["pipeline", "--workspace", str(dest)])  # its dvc.yaml, as
    assert r.exit_code == 0, r.output  # the demo has one: examples then print what they would there
    return dest


def run_example(argv: list[str], ws: Path, *, fails: bool = False) -> tuple[list[str], float]:
    """The example's output lines and seconds; ``fails``: it shows an error (a non-zero exit status)."""
    t = time.perf_counter()
    r = CliRunner().invoke(main, [*argv, "--workspace", str(ws)])
    dt = time.perf_counter() - t
    assert (r.exit_code != 0) == fails, f"{' '.join(argv)[:200]}:\n{r.output[-2000:]}"
    return [ln.rstrip() for ln in r.output.splitlines()], dt


def shows_error(expected: list[str]) -> bool:
    return bool(expected) and expected[0].startswith("Error:")


def _norm(lines: list[str]) -> list[str]:
    return [_SECONDS.sub("N s", ln) for ln in lines]


def compare(argv: list[str], expected: list[str], got: list[str]) -> str | None:
    want = expected[:expected.index("...")] if "..." in expected else expected
    have = got[:len(want)] if "..." in expected else got
    if _norm(have) != _norm(want):
        return (f"{' '.join(argv)[:120]}...\nREADME:\n" + "\n".join(want) +
                "\nnow:\n" + "\n".join(have))
    return None


EXAMPLES = examples(README.read_text())
HAVE_DEMO = (REPO / "lake/tables/images").is_dir() and (REPO / "lake/tables/agreement").is_dir()


def test_readme_examples_parse() -> None:
    sql = [a for a, _ in EXAMPLES if a[0] == "sql"]
    assert len(sql) >= 3
    assert {a[0] for a, _ in EXAMPLES} >= {"sql", "ingest", "agreement", "profile", "leakage"}
    for argv, expected in EXAMPLES:
        assert argv[0] in main.commands, argv[0]
        assert expected, f"README example without output: {' '.join(argv)[:80]}"


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_DEMO:
        pytest.skip("the demo workspace's lake is absent (run 'make demo')")
    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("real public metadata not found at ../shared/data")
    return demo_copy(tmp_path_factory.mktemp("readme") / "ws")


@pytest.mark.parametrize("n", range(len(EXAMPLES)),
                         ids=[f"{i}-{a[0]}" for i, (a, _) in enumerate(EXAMPLES)])
def test_readme_example_output_is_current(n: int, demo_ws: Path) -> None:
    """Examples run in README order (module scope, in one copy): later ones see earlier ones."""
    argv, expected = EXAMPLES[n]
    got, _ = run_example(argv, demo_ws, fails=shows_error(expected))
    problem = compare(argv, expected, got)
    assert problem is None, problem


def test_readme_params_typo_example_is_current(tmp_path: Path) -> None:
    """The "$ medlake duplicates" example (a misspelled key in a user's params.yaml) prints
    exactly what the README shows, in a workspace whose params.yaml has that key."""
    text = README.read_text()
    shown = next(ln for ln in text.splitlines() if ln.startswith("Error: params.yaml: duplicates."))
    key = shown.split("duplicates.", 1)[1].split(":", 1)[0]
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text(f"duplicates:\n  {key}: 0.9\n")
    r = CliRunner().invoke(main, ["duplicates", "--workspace", str(tmp_path)])
    assert r.exit_code != 0
    assert shown in r.output.splitlines(), r.output


def updated(text: str, argv: list[str], expected: list[str], got: list[str]) -> str:
    """``text`` with the example's output lines replaced by ``got`` (same ``...`` cut)."""
    cmd = shlex.join(argv)  # only to find the example: match on its first line
    first = expected[0] if expected else ""
    want = expected[:expected.index("...")] if "..." in expected else expected
    new = got[:len(want)] + ["..."] if "..." in expected else got
    old_block = "\n".join(expected)
    at = text.find("\n" + old_block + "\n", text.find(PROMPT + argv[0]))
    assert first and at >= 0, f"cannot place the output of {cmd[:80]}"
    return text[:at + 1] + "\n".join(new) + text[at + 1 + len(old_block):]


if __name__ == "__main__":  # after 'make demo': print what differs and each example's seconds
    import sys
    import tempfile

    bad, text = 0, README.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        ws = demo_copy(Path(tmp) / "ws")
        for argv, expected in EXAMPLES:
            got, dt = run_example(argv, ws, fails=shows_error(expected))
            problem = compare(argv, expected, got)
            print(f"{dt:6.2f} s  {'OK ' if problem is None else 'DIFF'}  {' '.join(argv)[:70]!r}")
            if problem:
                bad += 1
                print(problem)
                if "--update" in sys.argv:  # write the current output into README.md
                    text = updated(text, argv, expected, got)
    if "--update" in sys.argv and bad:
        README.write_text(text)
        print(f"README.md: {bad} example outputs rewritten; read the diff before committing")
    raise SystemExit(1 if bad and "--update" not in sys.argv else 0)
