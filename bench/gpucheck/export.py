"""Part 5: the exported part of the tiny AQR model, onnxruntime's CUDA provider against eager PyTorch on the GPU."""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Optional

import torch

from aqrcmt.checkpoint.io import save_safetensors_atomic
from aqrcmt.export.bundle import write_export
from aqrcmt.export.graph import DenseGraph, max_differences, sample_inputs
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset

from .part import Part
from .plan import Plan
from .timing import measure

PRESET = "tiny_aqr"


def export_skip_reason(device: torch.device) -> Optional[str]:
    """Why the export part cannot run here (None: it can): it needs CUDA and onnxruntime's CUDA provider."""
    if device.type != "cuda":
        return "no CUDA: onnxruntime's CUDA provider vs eager not timed (the CPU pair: bench/test_bench_export.py)"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'aqrcmt[export]' and onnxruntime-gpu)"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


def part_export(part: Part, plan: Plan) -> None:
    from aqrcmt.export.runtime import OnnxDetector

    device = plan.device
    part.protocol = [
        f"{PRESET}, random weights (seed 0), exported in fp32 and fp16 (aqrcmt export --format onnx); one synthetic "
        "sample (aqrcmt.export.graph.sample_inputs); the graph only (the LiDAR front end is outside it)",
        "eager = DenseGraph on the GPU, inputs already on the device, torch.inference_mode, synchronised; "
        "onnxruntime = InferenceSession with the CUDA provider fed NumPy arrays, so each run includes the "
        f"host-device copies of its inputs and outputs; warm-up {plan.warmup}, median of {plan.iters}",
        "max differences: per-query scores and boxes (m) of each engine against eager fp32 on the same GPU"]
    cfg = get_preset(PRESET)
    torch.manual_seed(0)
    detector = build_model(cfg.model).eval()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.safetensors"
        save_safetensors_atomic(detector.state_dict(), checkpoint, {"config": cfg.to_json()})
        engines = {}
        for precision in ("fp32", "fp16"):
            def export(precision=precision) -> dict:
                write_export(cfg, detector, checkpoint, Path(folder) / precision, fmt="onnx", precision=precision)
                engines[precision] = OnnxDetector(Path(folder) / precision, device="cuda")
                return {"item": f"export {precision}", "providers": engines[precision].session.get_providers()}
            part.item(f"export {precision}", export)
        inputs = sample_inputs(detector)
        feeds = {spec["name"]: value.numpy() for spec, value in
                 zip(engines["fp32"].manifest["inputs"], inputs)} if "fp32" in engines else {}
        graph = DenseGraph(detector.to(device))
        device_inputs = [value.to(device) for value in inputs]
        with torch.inference_mode():
            reference = tuple(output.cpu() for output in graph(*device_inputs))

        def eager() -> dict:
            with torch.inference_mode():
                timing = measure(lambda: graph(*device_inputs), device, plan.warmup, plan.iters, part.deadline)
            return {"item": "eager fp32", "median_ms": timing.median_ms, "min_ms": timing.min_ms}
        part.item("eager fp32", eager)
        for precision, engine in engines.items():
            def onnx_row(precision=precision, engine=engine) -> dict:
                timing = measure(lambda: engine.run(feeds), device, plan.warmup, plan.iters, part.deadline)
                return {"item": f"onnxruntime cuda {precision}", "median_ms": timing.median_ms,
                        "min_ms": timing.min_ms, **max_differences(reference, engine.run(feeds))}
            part.item(f"onnxruntime cuda {precision}", onnx_row)
    rows = {row["item"]: row for row in part.rows if "median_ms" in row}
    for precision in ("fp32", "fp16"):
        name = f"onnxruntime cuda {precision}"
        if "eager fp32" in rows and name in rows:
            part.check(f"{name} speed-up over eager fp32", rows["eager fp32"]["median_ms"] / rows[name]["median_ms"],
                       "> 1 (ratio of medians)", rows["eager fp32"]["median_ms"] > rows[name]["median_ms"])
