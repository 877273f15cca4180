"""pytest plugin of the conformance suite: options and fixtures (no heavy imports at load).

Installed through the ``pytest11`` entry point, so any pytest run in an environment with
portaserve has the options. Run the suite on a device with::

    pytest --portaserve-device NAME --pyargs portaserve.testing

(from a source checkout without ``pip install``, add ``-p portaserve.testing.pytest_plugin``).
``PORTASERVE_DEVICE`` is the default for ``--portaserve-device``.

Fixtures for vendors' own tests: ``portaserve_device`` (an instance of the device under test),
``portaserve_kernels`` (its ``KernelTable``), ``portaserve_gen`` (a seeded host generator) and
``portaserve_dtype`` (parametrized over the device's dtypes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

    from portaserve.plugins.device import Device
    from portaserve.plugins.kernel_table import KernelTable


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("portaserve", "portaserve device conformance suite")
    group.addoption(
        "--portaserve-device", default=None, metavar="NAME",
        help="device to check (a registered device name, or NAME:INDEX); "
        "defaults to $PORTASERVE_DEVICE")
    group.addoption(
        "--portaserve-dtype", action="append", default=None, metavar="DTYPE",
        help="check only this dtype (float32, float16, bfloat16); repeatable. "
        "Default: every dtype the device declares")
    group.addoption(
        "--portaserve-seed", type=int, default=0,
        help="mixed into each test's input seed (default 0)")


def device_spec(config: pytest.Config) -> str:
    """The device named by ``--portaserve-device`` or ``PORTASERVE_DEVICE``; a usage error if none."""
    from portaserve import envs

    name = config.getoption("portaserve_device", default=None) or envs.device()
    if not name:
        raise pytest.UsageError(
            "the portaserve conformance suite needs a device: "
            "pytest --portaserve-device NAME --pyargs portaserve.testing")
    return name


def _device(config: pytest.Config) -> Device:
    cached = getattr(config, "_portaserve_device", None)
    if cached is None:
        from portaserve.errors import PortaserveError
        from portaserve.plugins.manager import get_registry

        try:
            cached, _ = get_registry().select_device(device_spec(config), origin="--portaserve-device")
        except PortaserveError as e:
            raise pytest.UsageError(f"portaserve conformance: {e}") from e
        config._portaserve_device = cached  # type: ignore[attr-defined]
    return cached


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "portaserve_dtype" not in metafunc.fixturenames:
        return

    dtypes: tuple[torch.dtype, ...] = _device(metafunc.config).capabilities().dtypes
    wanted = metafunc.config.getoption("portaserve_dtype")
    if wanted:
        dtypes = tuple(d for d in dtypes if str(d).removeprefix("torch.") in wanted)
    metafunc.parametrize(
        "portaserve_dtype", dtypes, ids=[str(d).removeprefix("torch.") for d in dtypes])


@pytest.fixture(scope="session")
def portaserve_device(request: pytest.FixtureRequest) -> Device:
    """The device under test (one instance per session)."""
    return _device(request.config)


@pytest.fixture(scope="session")
def portaserve_kernels(portaserve_device: Device) -> KernelTable:
    """The device's resolved kernel table: plugin overrides, native kernels, reference."""
    from portaserve.plugins.manager import get_registry

    return get_registry().kernel_table(portaserve_device)


@pytest.fixture
def portaserve_gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A host generator seeded from the test id and ``--portaserve-seed``."""
    from portaserve.testing.conformance import generator

    return generator(request.node.nodeid, request.config.getoption("portaserve_seed"))


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    from portaserve import envs

    name = config.getoption("portaserve_device", default=None) or envs.device()
    return [f"portaserve conformance device: {name}"] if name else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "portaserve_e2e: end-to-end generation on the real model")
