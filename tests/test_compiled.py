"""A green run must never be a run of uncompiled source: every module comes from a C extension."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.pyx"))


def test_design_card_modules_exist():
    expected = {
        "constants",
        "credentials",
        "user",
        "unlock_state",
        "security",
        "hardware_service",
        "api_client",
        "cdn_manager",
        "binary_split",
        "unlock",
    }
    assert expected <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_is_compiled_extension(name):
    module = importlib.import_module(name)
    assert module.__file__.endswith(".so"), f"{name} was imported from {module.__file__}"
    assert Path(module.__file__).parent == ROOT
