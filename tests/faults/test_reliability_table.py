"""The Reliability table of docs/reliability.md is generated from the fault tests' docstrings and must match
them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "reliability_table.py"
HOW = (
    "regenerate it with `.venv/bin/python scripts/reliability_table.py --write` (or paste the output of the "
    "script without --write between <!-- reliability:start --> and <!-- reliability:end --> in "
    "docs/reliability.md)"
)


@pytest.fixture(scope="module")
def script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reliability_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_fault_test_states_what_it_proves(script):
    assert script.untagged() == [], (
        "every test in tests/faults needs a 'Reliability: <fault> | <outcome>' line"
    )


def test_entries_need_a_fault_and_an_outcome(script):
    assert script.entries_of("Does things.\n\nReliability: disk full | 507\n  and no file left\n\nMore.") == [
        ("disk full", "507 and no file left")
    ]
    with pytest.raises(ValueError):
        script.entries_of("Reliability: a fault without an outcome")


def test_the_table_matches_the_tests(script):
    printed = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert printed == script.table(script.collect())
    assert printed.count("\n") >= 2 + 10  # the header and a row for each fault and hostile input
    doc = ROOT / "docs" / "reliability.md"
    assert script.DOC == doc
    section = script.doc_section(doc.read_text()) if doc.exists() else None
    assert section is not None, f"docs/reliability.md has no Reliability table; {HOW}"
    assert section == printed, f"docs/reliability.md's Reliability table is out of date; {HOW}"


def test_the_table_is_kept_in_one_place(script):
    """The README links to docs/reliability.md: a second copy of the table would drift unchecked."""
    assert script.START not in (ROOT / "README.md").read_text()
