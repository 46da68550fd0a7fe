"""docs/configuration.md is the one table of the loader's settings: it must name every field of
main.Settings (upper-cased: the environment variable) with its default, and nothing else. Also: every
relative link in the README and docs/ leads to a file (and a heading) that exists."""

import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "configuration.md"
HEADER = "| variable | default | meaning |"
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
BYTES = re.compile(r"(\d+) (KiB|MiB|GiB)")
NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`")
UNSET = object()  # the table's `unset`: no default of the loader's own (None in Settings)


def table_rows(text: str) -> dict[str, str]:
    """``{variable: default cell}`` of the table; a row of two variables (`A` / `B`) gives one each."""
    lines = text.splitlines()
    if HEADER not in lines:
        raise ValueError(f"no table headed {HEADER!r}")
    rows = {}
    for line in lines[lines.index(HEADER) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != 3:
            raise ValueError(f"a row needs a variable, a default and a meaning: {line!r}")
        names = cells[0].split(" / ")
        defaults = cells[1].split(" / ") if len(names) > 1 else [cells[1]]
        if len(defaults) != len(names):
            raise ValueError(f"{len(names)} variables but {len(defaults)} defaults: {line!r}")
        for name, default in zip(names, defaults, strict=True):
            match = NAME.fullmatch(name)
            if match is None:
                raise ValueError(f"not a variable name in backquotes: {name!r}")
            if match[1] in rows:
                raise ValueError(f"{match[1]} is in the table twice")
            rows[match[1]] = default
    return rows


def parse_default(cell: str, annotation):
    """The value a default cell stands for, read as the field's type; anything else raises ValueError."""
    kinds = {annotation} if not isinstance(annotation, types.UnionType) else set(annotation.__args__)
    if cell == "unset":
        if type(None) not in kinds:
            raise ValueError("`unset` for a setting that has a default")
        return UNSET
    kind = (kinds - {type(None)}).pop()
    if cell == "empty":
        if kind is not str:
            raise ValueError("`empty` for a setting that is not text")
        return ""
    if match := BYTES.fullmatch(cell):
        if kind is not int:
            raise ValueError(f"a byte size for a setting of type {kind.__name__}")
        return int(match[1]) * UNITS[match[2]]
    if not (len(cell) > 2 and cell[0] == cell[-1] == "`" and "`" not in cell[1:-1]):
        raise ValueError(f"a default is `value`, N KiB/MiB/GiB, empty or unset: {cell!r}")
    raw = cell[1:-1]
    if kind is bool:
        if raw not in ("true", "false"):
            raise ValueError(f"not `true` or `false`: {cell!r}")
        return raw == "true"
    if kind is int:
        if not re.fullmatch(r"-?\d+", raw):
            raise ValueError(f"not a whole number: {cell!r}")
        return int(raw)
    if kind is float:
        if not re.fullmatch(r"-?\d+(\.\d+)?", raw):
            raise ValueError(f"not a number: {cell!r}")
        return float(raw)
    return raw


def differences(text: str, fields) -> list[str]:
    """What the table and ``fields`` (``Settings.model_fields``) disagree on; empty when they agree."""
    rows = table_rows(text)
    settings = {name.upper(): field for name, field in fields.items()}
    problems = [f"{name} is a setting missing from the table" for name in settings if name not in rows]
    problems += [f"{name} is in the table but not a setting" for name in rows if name not in settings]
    for name in rows.keys() & settings.keys():
        field = settings[name]
        try:
            documented = parse_default(rows[name], field.annotation)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        actual = UNSET if field.default is None else field.default
        if documented is not actual and (type(documented) is not type(actual) or documented != actual):
            problems.append(f"{name}: the table says {rows[name]}, Settings {field.default!r}")
    return sorted(problems)


@pytest.fixture(scope="module")
def fields():
    import main

    return main.Settings.model_fields


def test_the_table_names_every_setting_with_its_default(fields):
    assert differences(TABLE.read_text(), fields) == []
    assert len(table_rows(TABLE.read_text())) == len(fields) > 20


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("| 128 MiB |", "| 256 MiB |", "LOAD_MEMORY_BYTES: the table says 256 MiB"),
        ("| 1 GiB |", "| 1024 MiB |", None),  # the same bytes, written otherwise
        ("| 1 GiB |", "| 1 MiB |", "MODEL_CACHE_MIN_FREE_BYTES: the table says 1 MiB"),
        ("| `16384` / `30` |", "| `16384` / `31` |", "CDN_SPEED_TIME: the table says `31`"),
        ("| `30` |", "| `30.5` |", "API_TIMEOUT: the table says `30.5`"),
        ("`127.0.0.1` / `8080`", "`127.0.0.1` / `8080.0`", "LOADER_PORT: not a whole number"),
        ("`127.0.0.1` / `8080`", "`localhost` / `8080`", "LOADER_HOST: the table says `localhost`"),
        ("`REQUIRE_MANIFEST` | `false`", "`REQUIRE_MANIFEST` | `true`", "REQUIRE_MANIFEST: the table says"),
        ("`REQUIRE_MANIFEST` | `false`", "`REQUIRE_MANIFEST` | false", "REQUIRE_MANIFEST: a default is"),
        ("`LOADER_SOCKET` | empty", "`LOADER_SOCKET` | `/run/l.sock`", "LOADER_SOCKET: the table says"),
        ("`ALLOWED_HOSTS` | empty", "`ALLOWED_HOSTS` | unset", "ALLOWED_HOSTS: `unset` for a setting"),
        ("`DOCKER_HOST` | unset", "`DOCKER_HOST` | empty", "DOCKER_HOST: the table says empty"),
        ("`LOG_LEVEL` | `INFO` |", "`LOG_LEVEL` | `DEBUG` |", "LOG_LEVEL: the table says `DEBUG`"),
        ("| `MAX_JSON_BYTES` | 64 KiB |", "| `MAX_JSON_BYTES` | `65536` |", None),
        ("`MAX_JSON_BYTES`", "`MAX_JSON_BYTE`", "MAX_JSON_BYTES is a setting missing from the table"),
    ],
)
def test_a_changed_default_or_name_fails(fields, before, after, expected):
    """The check is strict: the table with one default or name changed (as a changed Settings would be)."""
    text = TABLE.read_text()
    assert text.count(before) == 1, before
    found = differences(text.replace(before, after), fields)
    if expected is None:
        assert found == []
    else:
        assert any(problem.startswith(expected) for problem in found), found


def test_a_setting_added_to_settings_fails(fields):
    import main

    added = {**fields, "new_setting": main.Settings.model_fields["loader_port"]}
    assert differences(TABLE.read_text(), added) == ["NEW_SETTING is a setting missing from the table"]


def test_the_other_documents_link_to_the_table_instead_of_repeating_it():
    for doc in (ROOT / "README.md", ROOT / "docs" / "contract.md", ROOT / "docs" / "container.md"):
        text = doc.read_text()
        assert "configuration.md" in text, doc
        assert HEADER not in text and "| variable | default |" not in text, f"{doc} tables the settings again"


# --- links -------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documents():
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "b.md").write_text("# A heading, with `code`\n")
    (tmp_path / "a.md").write_text(
        "[x](b.md#a-heading-with-code) [y](c.md) [z](b.md#nope) [w](https://e.org)"
    )
    assert anchors(tmp_path / "b.md") == {"a-heading-with-code"}
    assert broken_links(tmp_path / "a.md") == ["c.md (no such file)", "b.md#nope (no such heading)"]


def test_the_readme_stays_short_and_narrow():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 170
    assert [n for n, line in enumerate(lines, 1) if len(line) > 110] == []
