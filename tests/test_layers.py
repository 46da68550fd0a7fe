"""The compiled modules' layers (docs/design.md, "Module layers"): a module imports only from layers below it.

Tools that draw a Python project's structure do not read .pyx, so the import graph is read here: main.py
with ``ast``, each .pyx with a scanner over its text (strings and comments blanked out, bracketed and
backslash-continued lines joined), which finds module-level and function-level imports and cimports.
Fast: no module is imported, no process started.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A new module must be placed here (and in the picture in docs/design.md).
LAYERS = tuple(
    (layer, frozenset(names.split()))
    for layer, names in (
        ("base facts", "constants errors credentials logs schemas"),
        (
            "primitives",
            "security heap aligned_io read_ahead manifest signing user unlock_state workers deadlines "
            "edge error_answers boundary lifecycle",
        ),
        ("services", "api_client cdn_manager download disk_budget hardware_service"),
        ("cache", "model_cache"),
        ("orchestration", "binary_split unlock streaming upload_form metrics"),
        ("operations", "operations"),
        ("app", "main"),
    )
)


def modules():
    """The loader's own modules: every top-level .pyx, and main.py."""
    return {p.stem for p in ROOT.glob("*.pyx")} | {"main"}


# --- reading imports ------------------------------------------------------------------------------------

# A string literal (any prefix, triple-quoted or not) or a comment, scanned from the left so that a quote
# inside a comment, or a # inside a string, is taken for what it is.
_LITERAL = re.compile(
    r"""
    (?P<string> [rRbBuUfFcC]{0,2}
        (?: "{3} (?:\\[\s\S]|[\s\S])*? "{3}
          | '{3} (?:\\[\s\S]|[\s\S])*? '{3}
          | "    (?:\\[\s\S]|[^"\\\n])* "
          | '    (?:\\[\s\S]|[^'\\\n])* ' ) )
    | (?P<comment> \#[^\n]* )
    """,
    re.X,
)
_FROM = re.compile(r"from\s+(?P<module>\.*[\w.]*)\s+c?import\s+(?P<names>.+)", re.S)
_IMPORT = re.compile(r"c?import\s+(?P<names>.+)", re.S)


def _blank(match):
    """A string becomes an empty one (its newlines kept, so line numbers stay); a comment goes."""
    return '""' + "\n" * match.group(0).count("\n") if match.group("string") else ""


def _statements(text):
    """(line, text) of each simple statement: strings and comments blanked, a line ending in a backslash or
    inside brackets joined to the next, statements split at ';'."""
    text = _LITERAL.sub(_blank, text)
    depth, line, start, current = 0, 1, 1, []
    for ch in text + "\n":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "\n":
            line += 1
            if depth == 0 and not (current and current[-1] == "\\"):
                yield from ((start, part) for part in "".join(current).split(";"))
                current, start = [], line
                continue
            if current and current[-1] == "\\":
                current.pop()
            ch = " "
        current.append(ch)


def _names(text):
    """The names of ``a, b as c`` or ``(a, b)``: a, b."""
    return [part.split()[0] for part in text.strip().strip("()").split(",") if part.strip()]


def pyx_imports(text):
    """(line, module) of every import and cimport in Cython source, at any depth: ``import a.b, c as d``
    gives a and c; ``from a.b cimport x`` gives a. Relative imports (there are no packages) give ''."""
    found = []
    for line, statement in _statements(text):
        statement = statement.strip()
        if m := _FROM.fullmatch(statement):
            module = m.group("module")
            found.append((line, "" if module.startswith(".") else module.split(".")[0]))
        elif m := _IMPORT.fullmatch(statement):
            found.extend((line, name.split(".")[0]) for name in _names(m.group("names")))
    return found


def py_imports(text):
    """(line, module) of every import in Python source, at any depth (ast)."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module.split(".")[0] if node.level == 0 and node.module else ""))
    return found


def import_graph(root=ROOT):
    """{module: {(line, imported module of the loader's own)}}, for every .pyx and main.py."""
    own = {p.stem for p in root.glob("*.pyx")} | {"main"}
    graph = {"main": py_imports((root / "main.py").read_text())}
    for path in root.glob("*.pyx"):
        graph[path.stem] = pyx_imports(path.read_text())
    return {name: {(line, m) for line, m in found if m in own and m != name} for name, found in graph.items()}


# --- the rule ---------------------------------------------------------------------------------------------


def violations(graph, layers):
    """What breaks the layering: a module in no layer (or in two), and an import from the module's own
    layer or one above."""
    level, problems = {}, []
    for i, (_, members) in enumerate(layers):
        for name in members:
            if name in level:
                problems.append(f"{name} is in two layers")
            level.setdefault(name, i)
    for name in sorted(graph):
        if name not in level:
            problems.append(f"{name} is in no layer: place it in LAYERS (tests/test_layers.py)")
    for name, imports in sorted(graph.items()):
        for line, other in sorted(imports):
            if name in level and other in level and level[other] >= level[name]:
                where = "its own layer" if level[other] == level[name] else "a layer above"
                problems.append(
                    f"{name}:{line} imports {other}, of {where} ({layers[level[other]][0]}, "
                    f"{name} being in {layers[level[name]][0]})"
                )
    return problems


def test_every_module_is_in_one_layer_and_imports_only_from_below():
    assert violations(import_graph(), LAYERS) == []


def test_no_layer_names_a_module_that_is_gone():
    placed = set().union(*(members for _, members in LAYERS))
    assert placed - modules() == set()


def test_the_picture_in_the_design_page_shows_the_same_layers():
    """docs/design.md draws LAYERS: each module on the line (or the lines) of its layer's number."""
    section = (ROOT / "docs" / "design.md").read_text().split("## Module layers", 1)[1].split("\n## ", 1)[0]
    picture = section.split("```", 2)[1]
    drawn, layer = {}, None
    for row in picture.splitlines():
        if m := re.match(r"\s*(\d+)\s", row):
            layer = int(m.group(1))
        for word in re.findall(r"[\w.]+", row):
            name = word.removesuffix(".py")
            if name in modules() and layer is not None:
                drawn.setdefault(name, set()).add(layer)
    assert drawn == {name: {i} for i, (_, members) in enumerate(LAYERS) for name in members}


# --- the checker and the reader themselves ------------------------------------------------------------------


def test_an_import_from_the_same_or_a_higher_layer_fails():
    layers = (("low", {"a"}), ("mid", {"b", "c"}), ("high", {"d"}))
    fine = {"a": set(), "b": {(1, "a")}, "c": {(1, "a")}, "d": {(3, "b"), (4, "a")}}
    assert violations(fine, layers) == []
    sideways = {**fine, "b": {(1, "a"), (7, "c")}}
    assert violations(sideways, layers) == ["b:7 imports c, of its own layer (mid, b being in mid)"]
    upwards = {**fine, "a": {(2, "d")}}
    assert violations(upwards, layers) == ["a:2 imports d, of a layer above (high, a being in low)"]


def test_a_module_in_no_layer_fails():
    layers = (("low", {"a"}), ("high", {"b"}))
    assert violations({"a": set(), "b": {(1, "a")}, "new": set()}, layers) == [
        "new is in no layer: place it in LAYERS (tests/test_layers.py)"
    ]
    assert violations({"a": set()}, (("low", {"a"}), ("high", {"a"}))) == ["a is in two layers"]


def test_a_real_edge_upwards_would_be_caught(tmp_path):
    """The whole path on files: a copy of two modules, one given an import of a module above it."""
    (tmp_path / "main.py").write_text("import constants\n")
    (tmp_path / "constants.pyx").write_text("X = 1\n\ndef f():\n    import main  # late\n    return main\n")
    layers = (("base facts", {"constants"}), ("app", {"main"}))
    assert violations(import_graph(tmp_path), layers) == [
        "constants:4 imports main, of a layer above (app, constants being in base facts)"
    ]


CYTHON = '''\
# cython: language_level=3
"""A docstring that says
import not_an_import
from nowhere import nothing
"""
import os, json as j
from cpython.bytearray cimport PyByteArray_FromStringAndSize
cimport cython
from constants import (BIG_SUFFIX, MANIFEST_BLOCK_SIZE,  # a comment (with an "import x")
                       MAX_SIDECAR_BYTES)
from errors import \\
    IntegrityError
import a; import b.c
s = "import in_a_string"  # import in_a_comment
cdef extern from "stdlib.h":
    void free(void *ptr)


cdef class C:
    def f(self):
        import heavy  # late
        if True:
            from deep.er import (
                x,
                y,
            )
        t = f"""
import in_an_fstring
"""
'''


def test_the_reader_finds_every_kind_of_import_and_nothing_else():
    assert pyx_imports(CYTHON) == [
        (6, "os"),
        (6, "json"),
        (7, "cpython"),
        (8, "cython"),
        (9, "constants"),
        (11, "errors"),
        (13, "a"),
        (13, "b"),
        (21, "heavy"),
        (23, "deep"),
    ]


def test_the_reader_sees_the_known_imports_of_the_real_modules():
    """Function-level (deadlines, operations), parenthesised over lines (model_cache), cimport (security)."""
    graph = {name: {m for _, m in found} for name, found in import_graph().items()}
    assert "constants" in graph["deadlines"]
    assert {"streaming", "upload_form", "workers", "credentials"} <= graph["operations"]
    assert {"constants", "download", "disk_budget"} <= graph["model_cache"]
    assert {"signing", "binary_split", "model_cache", "metrics", "streaming"} <= graph["main"]
    assert "cpython" in {m for _, m in pyx_imports((ROOT / "security.pyx").read_text())}


def test_the_reader_agrees_with_ast_where_the_source_is_python():
    """Many .pyx files are plain Python (no cdef): there ``ast`` must find the very same imports."""
    compared = 0
    for path in sorted(ROOT.glob("*.pyx")):
        text = path.read_text()
        try:
            expected = py_imports(text)
        except SyntaxError:  # Cython syntax
            continue
        assert sorted(pyx_imports(text)) == sorted(expected), path.name
        compared += 1
    assert compared >= 10
