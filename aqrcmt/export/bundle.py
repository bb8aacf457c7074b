"""An export folder: the graph files, the LiDAR front end's weights and ``manifest.json``, written atomically.

    DIR/model.pt2                      torch.export ExportedProgram (``torch.export.load``), format torch
    DIR/model.onnx                     the same graph in ONNX (standard domain only), format onnx
    DIR/lidar_front_end.safetensors    weights of the part that stays outside the graph (models with LiDAR)
    DIR/manifest.json                  inputs / outputs (shape, dtype, meaning), the config, the checkpoint's
                                       sha256, the opset, the precision with the exported program's measured
                                       difference from eager fp32, what runs outside the graph

The folder is assembled beside DIR and renamed into place at the end (``aqrcmt.atomic.staged_directory``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aqrcmt.atomic import atomic_write_bytes, staged_directory
from aqrcmt.checkpoint.io import save_safetensors_atomic, sha256_of
from aqrcmt.config import Config
from aqrcmt.errors import AqrcmtError
from aqrcmt.export.graph import (DenseGraph, export_onnx, export_program, front_end_state, input_specs,
                                 max_differences, sample_inputs)
from aqrcmt.export.precision import HALF_MODULES, PRECISIONS, with_precision
from aqrcmt.models.detector import CmtDetector

MANIFEST = "manifest.json"
FILES = {"torch": "model.pt2", "onnx": "model.onnx", "lidar_front_end": "lidar_front_end.safetensors"}
FORMATS = ("torch", "onnx", "both")
OPSET = 18
EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")
OUTSIDE_GRAPH = [
    "LiDAR front end (voxelization, mean VFE, spconv sparse encoder -> dense BEV): PyTorch + spconv, weights in "
    "lidar_front_end.safetensors; voxel counts vary per sample and spconv builds its gather/scatter rules at run "
    "time (TensorRT deployments replace it with plugins)",
    "image and point preprocessing of the evaluation (resize, normalise, sweeps): aqrcmt.data",
    "the final filter: keep the top-k boxes whose centre lies in model.head.post_center_range and whose score "
    "exceeds model.head.score_threshold (a data-dependent count; aqrcmt.export.graph.finish_detections)",
]


class ExportError(AqrcmtError):
    """An export request or an export folder that cannot be used (missing extra, bad manifest, wrong format)."""


def require_export_extra() -> None:
    """Raise ExportError naming the optional extra when onnx / onnxscript / onnxruntime is not installed."""
    import importlib.util

    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export and the onnx engine need {', '.join(missing)}: "
                          "pip install 'aqrcmt[export]'")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def output_specs(detector: CmtDetector) -> list[dict[str, Any]]:
    """Name, shape, dtype and meaning of the graph's outputs (K = min(max_num, Nq * classes)); see DenseGraph."""
    head = detector.cfg.head
    k = min(head.max_num, head.num_query * head.num_classes)
    return [
        {"name": "scores", "shape": [1, k], "dtype": "float32",
         "meaning": "sigmoid class scores of the K best (query, class) pairs of the last decoder layer, best first"},
        {"name": "labels", "shape": [1, k], "dtype": "int64", "meaning": "class index of each pair (CLASS_NAMES)"},
        {"name": "boxes", "shape": [1, k, 9], "dtype": "float32",
         "meaning": "x, y, z (gravity centre), dx, dy, dz (m), yaw (rad), vx, vy (m/s) in the LiDAR frame"},
        {"name": "query_scores", "shape": [1, head.num_query, head.num_classes], "dtype": "float32",
         "meaning": "sigmoid class scores of every query (for comparing runtimes; equal scores reorder the top-k)"},
        {"name": "query_boxes", "shape": [1, head.num_query, 9], "dtype": "float32",
         "meaning": "the box of every query, laid out as boxes"},
    ]


def measure_precision(detector: CmtDetector, program: torch.export.ExportedProgram, precision: str) -> dict:
    """The manifest's ``precision`` field: the name, the float16 modules, and the largest |difference| of the
    exported program's per-query scores and boxes from eager fp32 `detector` on one synthetic sample."""
    inputs = sample_inputs(detector)
    with torch.no_grad():
        difference = max_differences(DenseGraph(detector)(*inputs), program.module()(*inputs))
    return {"name": precision,
            "float16_modules": [name for name in HALF_MODULES if getattr(detector, name, None) is not None]
            if precision == "fp16" else [],
            "max_abs_difference_vs_eager_fp32": {"input": "aqrcmt.data.synthetic_batch sample (seed 0)",
                                                 **difference}}


def build_manifest(cfg: Config, detector: CmtDetector, checkpoint: Path, formats: list[str],
                   precision: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an export of `detector` (built from `cfg`) from the weights file `checkpoint`;
    `precision`: :func:`measure_precision`'s record."""
    files = {fmt: FILES[fmt] for fmt in formats}
    if detector.with_lidar:
        files["lidar_front_end"] = FILES["lidar_front_end"]
    return {
        "format": "aqrcmt-export", "format_version": 1,
        "files": files,
        "precision": precision,
        "opset": OPSET if "onnx" in formats else None,
        "torch_version": torch.__version__,
        "batch_size": 1,
        "inputs": [{**spec, "dtype": _dtype_name(spec["dtype"])} for spec in input_specs(detector)],
        "outputs": output_specs(detector),
        "outside_graph": OUTSIDE_GRAPH,
        "checkpoint": {"file": str(checkpoint), "sha256": sha256_of(checkpoint)},
        "config": cfg.to_dict(),
    }


def write_export(cfg: Config, detector: CmtDetector, checkpoint: Path, out: Path, *, fmt: str,
                 precision: str = "fp32") -> dict[str, Any]:
    """Export `detector` (the model of `cfg`, weights from `checkpoint`) into the folder `out` (missing or
    empty) in `precision` (:mod:`aqrcmt.export.precision`); returns the manifest. Raises ExportError for an
    unknown format or precision, or a missing extra."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    formats = ["torch", "onnx"] if fmt == "both" else [fmt]
    if "onnx" in formats:
        require_export_extra()
    detector = detector.cpu().eval()
    with staged_directory(out, replace=False) as staging:
        program = export_program(with_precision(detector, precision))
        manifest = build_manifest(cfg, detector, checkpoint, formats, measure_precision(detector, program, precision))
        if "torch" in formats:
            torch.export.save(program, staging / FILES["torch"])
        if "onnx" in formats:
            model = export_onnx(program, detector, OPSET)
            atomic_write_bytes(staging / FILES["onnx"], model.SerializeToString())
        if detector.with_lidar:
            save_safetensors_atomic(front_end_state(detector), staging / FILES["lidar_front_end"])
        atomic_write_bytes(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an export folder; ExportError names the file and field that is missing or wrong."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} does not exist: --model must be a folder written by `aqrcmt export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "aqrcmt-export":
        raise ExportError(f"{path}: field 'format' is not 'aqrcmt-export'")
    for field in ("files", "config", "inputs", "outputs"):
        if field not in manifest:
            raise ExportError(f"{path}: field {field!r} is missing")
    for name in manifest["files"].values():
        if not (directory / name).is_file():
            raise ExportError(f"{path}: field 'files' names {name}, which is not in {directory}")
    return manifest
