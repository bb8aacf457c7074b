"""fp32's own noise floor for the exported graph: how far eager PyTorch moves from itself and from float64, next
to how far torch.export and onnxruntime move, per box parameter and at the layers where the difference starts.

    python bench/export_fp32_floor.py [--config cmt_voxel0100_r50_800x320_cbgs] [--runs RUN ...] [--out FILE.md]

One synthetic sample (``aqrcmt.export.graph.sample_inputs``: points + random images, seed 0), random weights
(``torch.manual_seed(0)``), the graph of ``aqrcmt export`` (:class:`DenseGraph`) with a few intermediate tensors as
extra outputs (:data:`TAPS`). The reference is eager fp32 on one intra-op thread, as in tests/test_export.py.
The runs (:data:`RUNS`):

- ``eager_2threads``: eager fp32 on two intra-op threads (other reduction splits in the convolutions and matmuls);
- ``eager_no_mkldnn``: eager fp32 with oneDNN off (PyTorch's own convolution kernels);
- ``float64``: eager with every floating tensor, weight and explicit float32 cast promoted to float64 (a
  ``TorchFunctionMode``): the rounding-free answer the fp32 runs are measured against as well;
- ``torch.export``: the decomposed ExportedProgram that ``aqrcmt export`` saves, run by PyTorch;
- ``onnxruntime`` / ``onnxruntime_no_opt``: its ONNX graph on onnxruntime's CPU provider, one thread, with the
  default graph optimisations and with ``ORT_DISABLE_ALL``.

Prints (and with --out writes) markdown tables: each run's largest |difference| of the per-query scores and box
parameters from eager fp32 and from float64, and per tapped tensor each run's largest |difference| from float64.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.export.bundle import OPSET
from aqrcmt.export.graph import (OUTPUT_NAMES, ClosedFormInverse, DenseGraph, decompositions, input_specs,
                                 sample_inputs)
from aqrcmt.models import build_model
from aqrcmt.models.detector import CmtDetector
from aqrcmt.presets import load_config

RUNS: tuple[str, ...] = ("eager_2threads", "eager_no_mkldnn", "float64", "torch.export", "onnxruntime",
                         "onnxruntime_no_opt")
# Box parameters of query_boxes (1, Nq, 9), grouped as the tables show them.
BOX_GROUPS: dict[str, slice] = {"centre x, y (m)": slice(0, 2), "z (m)": slice(2, 3), "size (m)": slice(3, 6),
                                "yaw (rad)": slice(6, 7), "velocity (m/s)": slice(7, 9)}


@dataclass(frozen=True)
class Tap:
    """An intermediate tensor: the output of the submodule at `path` (or its first input, with `first_input`),
    reduced by `pick` to the tensor compared."""
    name: str
    path: str
    pick: Callable = lambda value: value
    first_input: bool = False


LAYER0 = "pts_bbox_head.transformer.decoder.layers.0."
TAPS: tuple[Tap, ...] = (
    Tap("BEV features (SECOND + FPN)", "pts_neck", lambda value: value[0] if isinstance(value, list) else value),
    Tap("camera features (CP-FPN)", "img_neck", lambda value: value[0]),
    Tap("decoder layer 0: cross-attention query (query positions)", LAYER0 + "attentions.1", first_input=True),
    Tap("decoder layer 0: cross-attention output", LAYER0 + "attentions.1"),
    Tap("decoder layer 0: layer norm after it", LAYER0 + "norms.1"),
    Tap("decoder output, last layer (post-norm)", "pts_bbox_head.transformer", lambda value: value[-1]),
    Tap("raw centre logit, last layer (before the metre decode)", "pts_bbox_head.task_heads.0",
        lambda value: value["center"][-1]),
)


class TappedGraph(DenseGraph):
    """:class:`DenseGraph` whose outputs are followed by the :data:`TAPS` tensors the model has."""

    def __init__(self, detector: CmtDetector) -> None:
        super().__init__(detector)
        self.taps = [tap for tap in TAPS if _has_submodule(detector, tap.path)]
        self.captured: dict[str, Tensor] = {}
        for tap in self.taps:
            module = detector.get_submodule(tap.path)
            if tap.first_input:
                module.register_forward_pre_hook(lambda m, args, tap=tap: self._keep(tap, args[0]))
            else:
                module.register_forward_hook(lambda m, args, output, tap=tap: self._keep(tap, output))

    def _keep(self, tap: Tap, value) -> None:
        self.captured[tap.name] = tap.pick(value)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        outputs = super().forward(*inputs)
        return (*outputs, *(self.captured.pop(tap.name) for tap in self.taps))


def _has_submodule(detector: CmtDetector, path: str) -> bool:
    try:
        return detector.get_submodule(path) is not None
    except AttributeError:
        return False


class Float64(TorchFunctionMode):
    """While active, every float32 tensor operand and every float32 dtype argument becomes float64, and
    ``Tensor.float()`` returns float64: the model's own float32 casts (position encodings) are promoted too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def promote(value):
            if isinstance(value, Tensor) and value.dtype == torch.float32:
                return value.double()
            return torch.float64 if value is torch.float32 else value

        with torch._C.DisableTorchFunction():
            if func is Tensor.float:
                return args[0].double()
            return func(*tree_map(promote, args), **tree_map(promote, kwargs or {}))


def onnx_session(program: torch.export.ExportedProgram, detector: CmtDetector, folder: Path, optimise: bool):
    """An onnxruntime CPU session (one thread) of `program`'s ONNX graph, with or without graph optimisations."""
    import onnxruntime

    path = folder / "tapped.onnx"
    if not path.exists():
        torch.onnx.export(program, dynamo=True, opset_version=OPSET, verbose=False,
                          input_names=[spec["name"] for spec in input_specs(detector)]).save(str(path))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimise:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(name: str, graph: TappedGraph, exact: Optional[TappedGraph], inputs: tuple[Tensor, ...],
        program: torch.export.ExportedProgram, folder: Path) -> tuple[Tensor, ...]:
    """The outputs (float64 copies) of one run of :data:`RUNS` (or ``eager``, the reference): of the fp32 `graph`,
    its float64 copy `exact`, or its `program`."""
    with torch.no_grad():
        if name == "float64":
            with Float64():
                outputs = exact(*inputs)
        elif name == "torch.export":
            outputs = program.module()(*inputs)
        elif name.startswith("onnxruntime"):
            session = onnx_session(program, graph.detector, folder, optimise=name == "onnxruntime")
            feeds = {value.name: tensor.numpy() for value, tensor in zip(session.get_inputs(), inputs)}
            outputs = tuple(torch.from_numpy(array) for array in session.run(None, feeds))
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(2 if name == "eager_2threads" else 1)
            with torch.backends.mkldnn.flags(enabled=name != "eager_no_mkldnn"):
                outputs = graph(*inputs)
            torch.set_num_threads(threads)
    return tuple(output.double() if output.is_floating_point() else output for output in outputs)


def output_differences(reference: tuple[Tensor, ...], got: tuple[Tensor, ...]) -> list[float]:
    """Largest |difference| of query_scores and of each :data:`BOX_GROUPS` group of query_boxes."""
    scores, boxes = OUTPUT_NAMES.index("query_scores"), OUTPUT_NAMES.index("query_boxes")
    box = (reference[boxes] - got[boxes]).abs()
    return [(reference[scores] - got[scores]).abs().max().item(),
            *(box[..., group].max().item() for group in BOX_GROUPS.values())]


def markdown(config: str, results: dict[str, tuple[Tensor, ...]], taps: list[Tap], command: str) -> str:
    """The three tables of the module docstring."""
    lines = [f"# fp32 noise floor of the exported graph: `{config}`", "", f"`{command}`", "",
             f"Machine: {os.cpu_count()}-core {platform.machine()} CPU; torch {torch.__version__}, onnxruntime "
             f"{metadata.version('onnxruntime')}; one synthetic sample (points + random images), random weights.", ""]
    header = "| run | scores | " + " | ".join(BOX_GROUPS) + " |"
    rule = "|---" * (len(BOX_GROUPS) + 2) + "|"
    for reference in ("eager", "float64"):
        if reference not in results:
            continue
        lines += [f"Largest |difference| from {'eager fp32 (one thread)' if reference == 'eager' else 'float64'}:",
                  "", header, rule]
        for name, outputs in results.items():
            if name != reference:
                values = output_differences(results[reference], outputs)
                lines.append(f"| {name} | " + " | ".join(f"{value:.1e}" for value in values) + " |")
        lines.append("")
    if "float64" in results:
        runs = [name for name in results if name != "float64"]
        lines += ["Largest |difference| from float64 of the tapped tensors (max |value| from float64):", "",
                  "| tensor | max abs | " + " | ".join(runs) + " |", "|---" * (len(runs) + 2) + "|"]
        start = len(OUTPUT_NAMES)
        for index, tap in enumerate(taps, start):
            exact = results["float64"][index]
            lines.append(f"| {tap.name} | {exact.abs().max().item():.1e} | "
                         + " | ".join(f"{(exact - results[name][index]).abs().max().item():.1e}" for name in runs)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cmt_voxel0100_r50_800x320_cbgs", help="preset name or config .json")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="runs besides eager fp32")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    detector = build_model(cfg.model).eval()
    inputs = sample_inputs(detector)
    exact = TappedGraph(copy.deepcopy(detector).double()) if "float64" in args.runs else None
    graph = TappedGraph(detector)
    with torch.no_grad(), ClosedFormInverse():
        program = torch.export.export(graph, inputs, strict=False)
    program = program.run_decompositions(decompositions())
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("eager", *args.runs):
            start = time.perf_counter()
            results[name] = run(name, graph, exact, inputs, program, Path(folder))
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    command = "python bench/export_fp32_floor.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(args.config, results, graph.taps, command)
    print(text)
    if args.out is not None:
        atomic_write_bytes(args.out, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
