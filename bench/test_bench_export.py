"""The exported part of the tiny AQR model: onnxruntime against eager PyTorch, one thread each, in one run.

Run: `python -m pytest bench/test_bench_export.py --benchmark-only -m ''`; pytest-benchmark's table gives each
engine's time and, in parentheses, its ratio to the faster one. Results: bench/results/export_cpu.md and
docs/deployment.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aqrcmt.checkpoint.io import save_safetensors_atomic
from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.export.bundle import write_export
from aqrcmt.export.graph import DenseGraph
from aqrcmt.export.runtime import OnnxDetector
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset

PRESET = "tiny_aqr"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    """(eager graph, onnxruntime detector, inputs of one synthetic sample), both on one thread."""
    torch.set_num_threads(1)
    cfg = get_preset(PRESET)
    torch.manual_seed(0)
    detector = build_model(cfg.model).eval()
    folder = tmp_path_factory.mktemp("export")
    checkpoint = folder / "model.safetensors"
    save_safetensors_atomic(detector.state_dict(), checkpoint, {"config": cfg.to_json()})
    write_export(cfg, detector, checkpoint, folder / "export", fmt="onnx")
    engine = OnnxDetector(Path(folder / "export"), threads=1)
    feeds = engine.graph_inputs(synthetic_batch(cfg.model, batch_size=1, num_boxes=(6,)), 0)
    return DenseGraph(detector), engine, feeds


@pytest.mark.benchmark(group="export-tiny_aqr-cpu")
@pytest.mark.parametrize("engine", ["eager", "onnxruntime"])
def test_exported_part(benchmark, engines, engine: str) -> None:
    graph, onnx_engine, feeds = engines
    if engine == "eager":
        inputs = [torch.from_numpy(array) for array in feeds.values()]

        def run():
            with torch.no_grad():
                return graph(*inputs)
    else:
        def run():
            return onnx_engine.run(feeds)
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
