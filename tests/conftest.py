"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DEVICE_DIR = REPO / "examples" / "portaserve-example-device"


@pytest.fixture(scope="session")
def example_device_module() -> ModuleType:
    """The example vendor plugin module: installed, or imported from its source folder."""
    try:
        return importlib.import_module("portaserve_example_device")
    except ImportError:
        sys.path.insert(0, str(EXAMPLE_DEVICE_DIR))
        return importlib.import_module("portaserve_example_device")
