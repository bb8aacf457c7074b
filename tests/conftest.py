"""Shared fixtures. `synthetic_root` is the default synthetic nuScenes, written once per test session."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from parity_bundle import parity_file

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


_SKIPPED_PARITY: list[str] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.parity("head")` tests need `head.pt` of the parity bundle: skipped by name when it is absent."""
    marker = item.get_closest_marker("parity")
    if marker is not None and not parity_file(marker.args[0]).is_file():
        _SKIPPED_PARITY.append(item.nodeid)
        pytest.skip(f"parity bundle file {parity_file(marker.args[0])} not found (set AQRCMT_PARITY_DIR)")


def pytest_report_header(config: pytest.Config) -> str:
    """The free space where the tests write (runs, checkpoints, datasets): a full disk fails the training tests."""
    given = Path(config.option.basetemp or tempfile.gettempdir()).resolve()
    base = next(folder for folder in (given, *given.parents) if folder.exists())
    return f"free disk space for the tests' files in {base}: {shutil.disk_usage(base).free / 2**30:.1f} GiB"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _SKIPPED_PARITY:
        terminalreporter.write_line(f"{len(_SKIPPED_PARITY)} parity test(s) skipped: the official-code bundle is "
                                    "not beside this checkout (set AQRCMT_PARITY_DIR):")
        for nodeid in _SKIPPED_PARITY:
            terminalreporter.write_line(f"  {nodeid}")
