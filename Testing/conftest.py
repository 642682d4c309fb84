"""Puts ``TCURLoRASegment/`` on the import path, as Slicer and the background process do; shared fixtures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a 2-core machine shared with other jobs, two OpenMP threads made
    the tiny UNETR's steps several times slower (spin waits), not faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
