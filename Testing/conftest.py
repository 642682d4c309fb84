"""Puts ``TCURLoRASegment/`` on the import path, as Slicer and the background process do; shared fixtures.

``--device`` (default ``cpu``) names the torch device that the tests marked ``gpu`` run on (the ``device``
fixture): ``pytest Testing -m gpu --device cuda`` runs the suite's device-dependent tests on a GPU
(``Testing/benchmarks/gpu_check.py`` does so). Every other test runs on the CPU whatever ``--device`` says.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="torch device of the tests marked gpu: cpu (default), cuda or cuda:N")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: the test runs on the device of --device (default cpu); run them on a "
                                       "GPU with -m gpu --device cuda")
    from TCURLoRALib.devices import resolve_device

    try:
        config.test_device = resolve_device(config.getoption("--device"))
    except ValueError as error:  # a wrong spelling, or CUDA where there is none: before any test runs
        raise pytest.UsageError(f"pytest --device: {error}") from None
    if config.test_device.type == "cuda":
        # The tests check the maths at each dtype's own precision; TensorFloat-32 (cuDNN's default for float32
        # convolutions) rounds to 10 mantissa bits, far coarser than their tolerances.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The torch device of ``--device`` (``cpu`` unless asked otherwise); for tests marked ``gpu``."""
    return pytestconfig.test_device


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a 2-core machine shared with other jobs, two OpenMP threads made
    the tiny UNETR's steps several times slower (spin waits), not faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
