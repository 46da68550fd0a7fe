#!/usr/bin/env python3
"""The Reliability table of docs/reliability.md, generated from the fault tests so that it cannot drift.

Every test in tests/faults/ says what it breaks and what the loader does, in its docstring:

    Reliability: <fault or hostile input> | <what the loader does>

(a line of its own; the entry may go on over the next lines, up to a blank line or the next entry).
This script reads those docstrings with ``ast`` (nothing is imported or run) and prints the table:

    .venv/bin/python scripts/reliability_table.py            # print the Markdown table
    .venv/bin/python scripts/reliability_table.py --write    # replace it in docs/reliability.md (markers)

tests/faults/test_reliability_table.py fails when docs/reliability.md holds anything else between the
markers.
"""

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ROOT / "tests" / "faults"
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"
TAG = "Reliability:"
SELF_TEST = "test_reliability_table.py"  # tests this script, not the loader


def entries_of(docstring: str) -> list[tuple[str, str]]:
    """The ``(fault, outcome)`` pairs of one docstring."""
    entries, current = [], None
    for line in docstring.splitlines():
        line = line.strip()
        if line.startswith(TAG):
            current = [line[len(TAG) :].strip()]
            entries.append(current)
        elif line and current is not None:
            current.append(line)
        else:
            current = None
    pairs = []
    for parts in entries:
        fault, sep, outcome = " ".join(parts).partition(" | ")
        if not sep or not fault.strip() or not outcome.strip():
            raise ValueError(f"a Reliability line needs '<fault> | <outcome>': {' '.join(parts)!r}")
        pairs.append((fault.strip(), outcome.strip()))
    return pairs


def _modules(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("test_*.py")) if p.name != SELF_TEST]


def tests_of(path: Path):
    """``(test name, docstring)`` of every test function in a module, in source order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
            yield node.lineno, node.name, ast.get_docstring(node) or ""


def collect(folder: Path = FAULTS) -> list[tuple[str, str, str]]:
    """``(fault, outcome, test)`` rows of every ``test_*.py`` in ``folder``: files by name, tests in order."""
    rows = []
    for path in _modules(folder):
        for _, name, doc in sorted(tests_of(path)):
            rows += [(fault, outcome, f"{path.name}::{name}") for fault, outcome in entries_of(doc)]
    return rows


def untagged(folder: Path = FAULTS) -> list[str]:
    """Tests that state no Reliability entry (every fault test must appear in the table)."""
    return [
        f"{path.name}::{name}"
        for path in _modules(folder)
        for _, name, doc in sorted(tests_of(path))
        if not entries_of(doc)
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| Fault or hostile input | What the loader does | Test |", "|---|---|---|"]
    lines += [f"| {_cell(fault)} | {_cell(outcome)} | `{test}` |" for fault, outcome, test in rows]
    return "\n".join(lines) + "\n"


def doc_section(text: str) -> str | None:
    """What the document holds between the markers, or None when they are missing."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write(doc: Path, generated: str) -> None:
    text = doc.read_text()
    if doc_section(text) is None:
        raise SystemExit(f"{doc} has no {START} ... {END} section: add the two markers first")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{START}\n{generated}{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/reliability.md")
    args = parser.parse_args(argv)
    generated = table(collect())
    if args.write:
        write(DOC, generated)
    else:
        sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
