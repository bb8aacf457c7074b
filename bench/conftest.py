"""Benchmarks (pytest-benchmark). `make bench` runs `pytest bench --benchmark-only -m ''`.

Files named bench_*.py are collected here only (the default `pytest` run uses testpaths = tests).
`--bench-markdown PATH` (with `--benchmark-json`) also writes the results as a markdown table.
"""
from __future__ import annotations

import fnmatch
import os
import platform
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-markdown", default=None, help="write the benchmark results as a markdown table here")


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    # Add the bench_*.py files pytest itself would skip (not named on the command line, not matching python_files).
    collected_anyway = parent.session.isinitpath(file_path) or any(
        fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files"))
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not collected_anyway:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _skip_without_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU benchmarks run on a machine with a GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would time Triton's interpreter, not the GPU kernels")


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    """Each benchmark on CPU and on CUDA (skipped, with the reason, where no GPU runs compiled kernels)."""
    if request.param == "cuda":
        _skip_without_gpu()
    return request.param


@pytest.fixture
def cuda_device() -> str:
    _skip_without_gpu()
    return "cuda"


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    path = config.getoption("--bench-markdown")
    if not path:
        return
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU" + (f", {torch.cuda.get_device_name()}"
                                                                if torch.cuda.is_available() else "")
    lines = [f"Machine: {cpu}; torch {torch.__version__}; threads {torch.get_num_threads()}.", "",
             "| benchmark | median (ms) | min (ms) | rounds |", "|---|---|---|---|"]
    for bench in output_json["benchmarks"]:
        stats = bench["stats"]
        lines.append(f"| {bench['name']} | {stats['median'] * 1e3:.3f} | {stats['min'] * 1e3:.3f} | "
                     f"{stats['rounds']} |")
    Path(path).write_text("\n".join(lines) + "\n")
