"""docs/threat-model.md names the test behind each thing an adversary cannot do: each name must be a test
that exists, so a renamed or deleted test breaks this one, not the document's promise."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "threat-model.md"
# `file.py::test_name`, or `::test_name` for another test of the file named just before it.
REFERENCE = re.compile(r"`((?:[\w/]+\.py)?)::(test_\w+)`|`([\w/]+\.py)`")


def references():
    found, last = [], None
    for file, name, bare in REFERENCE.findall(DOC.read_text()):
        if bare:
            found.append((bare, None))
            continue
        last = file or last
        found.append((last, name))
    return found


def defined_tests(path):
    tree = ast.parse(path.read_text())
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_threat_model_names_exists():
    refs = references()
    assert len([r for r in refs if r[1]]) >= 25  # the document names its tests; a parse that finds none fails
    missing = []
    for file, name in refs:
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_every_row_of_the_table_says_what_proves_it():
    table = [
        line
        for line in DOC.read_text().split("## The table")[1].split("\n## ")[0].splitlines()
        if line.startswith("| ")
    ]
    rows = table[2:] if table[1].startswith("|---") else table[1:]
    adversaries = [row.split("|")[1].strip() for row in table if not row.startswith("|---")][1:]
    assert adversaries == [
        "holds the CDN",
        "holds the API",
        "holds the API and the CDN",
        "on the network path",
        "another process or container on the device",
        "a web page in a browser on the device",
        "a stolen device, powered off",
    ]
    numbered = set(re.findall(r"^(\d+)\. \*\*", DOC.read_text(), re.M))
    for row in rows:
        for cell in row.split("|")[2:-1]:
            if "cannot" in cell:
                # Each "cannot" names the numbered paragraph whose tests prove it.
                cited = re.findall(r"\((\d+)(?:, (\d+))?\)", cell)
                assert cited, row
                assert {n for pair in cited for n in pair if n} <= numbered, row
