"""CI configuration: every Woodpecker pipeline is valid against Woodpecker's own schema, the ARM64
pipeline tests before it pushes the right image, and the Dockerfile passes hadolint."""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WOODPECKER = ROOT / ".woodpecker"
SCHEMA = WOODPECKER / "schema" / "schema.json"
PIPELINES = sorted([*WOODPECKER.glob("*.yml"), *WOODPECKER.glob("*.yaml")])
BUILDX = "woodpeckerci/plugin-docker-buildx"


def _tool(name: str) -> str:
    """A console script from the venv running the tests (requirements-dev.txt), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing; it comes with requirements-dev.txt", pytrace=False)
    return found


def _check_schema(pipeline: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool("check-jsonschema"), "--schemafile", str(SCHEMA), str(pipeline)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_there_are_pipelines():
    assert [p.name for p in PIPELINES if p.name == "build-arm.yml"], PIPELINES


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_pipeline_is_valid_woodpecker_config(pipeline):
    result = _check_schema(pipeline)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_an_invalid_pipeline(tmp_path):
    # A step without an image, and a key Woodpecker does not know: the check must not be a rubber stamp.
    broken = tmp_path / "broken.yml"
    broken.write_text("steps:\n  - name: build\n    commands: [make]\n    privileges: true\n")
    result = _check_schema(broken)
    assert result.returncode != 0, result.stdout


def test_vendored_schema_is_the_noted_copy():
    source = (SCHEMA.parent / "SOURCE.md").read_text()
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() in source
    assert "woodpecker-ci/woodpecker" in source
    assert "pipeline/frontend/yaml/linter/schema/schema.json" in source
    assert re.search(r"\b[0-9a-f]{40}\b", source), "the commit of the copy"
    assert "Apache" in source


def _steps(config: dict) -> list[dict]:
    steps = config["steps"]
    if isinstance(steps, dict):  # the map form: name -> step
        return [{"name": name, **step} for name, step in steps.items()]
    return steps


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_arm_pipeline_tests_then_pushes_the_arm64_image():
    config = yaml.safe_load((WOODPECKER / "build-arm.yml").read_text())
    assert config["labels"]["platform"] == "linux/arm64", "must run on an arm64 agent"

    steps = _steps(config)
    tests = [i for i, step in enumerate(steps) if "make test" in " ".join(step.get("commands", []))]
    publish = [i for i, step in enumerate(steps) if step["image"].split(":")[0] == BUILDX]
    assert tests and len(publish) == 1, steps
    assert tests[0] < publish[0], "the suite runs before the image is pushed"
    assert steps[tests[0]]["image"].startswith("python:3.11")

    step = steps[publish[0]]
    assert ":" in step["image"], "pin the plugin version (it must match WOODPECKER_PLUGINS_PRIVILEGED)"
    settings = step["settings"]
    assert _as_list(settings["platforms"]) == ["linux/arm64"]
    assert sorted(_as_list(settings["tags"])) == sorted(["latest", "${CI_COMMIT_SHA:0:8}"])
    for key in ("registry", "repo", "username", "password"):
        assert isinstance(settings[key], dict) and set(settings[key]) == {"from_secret"}, key

    events = {event for cond in _as_list(step.get("when", [])) for event in _as_list(cond.get("event", []))}
    assert events and "pull_request" not in events, "pull requests must never push an image"


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
