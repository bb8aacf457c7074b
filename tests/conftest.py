"""Shared fixtures. `synthetic_root` is the default synthetic nuScenes, written once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SYNTHETIC_VERSION = "v1.0-mini"      # train scenes from mini_train, val scenes from mini_val


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the default synthetic nuScenes (v1.0-mini: 2 mini_train + 1 mini_val scenes x 6 samples)."""
    from aqrcmt.data.synthetic import make_synthetic_nuscenes

    return make_synthetic_nuscenes(tmp_path_factory.mktemp("synthetic_nuscenes"), version=SYNTHETIC_VERSION)


@pytest.fixture
def one_torch_thread():
    """Two intra-op threads on a shared 2-core machine slow the training runs down many times; one is enough."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
