"""The precision of an export: fp32, or fp16 for the convolutional backbones and necks.

fp16 casts the weights of :data:`HALF_MODULES` to float16 and wraps each of them in two hooks: floating inputs
are cast to float16 on the way in and floating outputs back to float32 on the way out. Everything else stays
float32: the position encodings (built from the float64 projections), the AQR generator / render / modulate, the
transformer (its softmax and layer norms: in fp16 the decomposed attention of the export and PyTorch's fused CPU
attention already differ by 0.15 m on random tiny weights), the task heads with their group layer norms, the
sigmoid and the box decoding. The graph's inputs and outputs keep
their fp32 dtypes, so a runtime feeds an fp16 export exactly as an fp32 one. The casts are explicit ops in the
traced graph (no autocast), so eager PyTorch, torch.export and ONNX compute the same mixed-precision model.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from aqrcmt.models.detector import CmtDetector

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
# The convolutional backbones + necks: most multiply-adds of the exported part at the released sizes.
HALF_MODULES: tuple[str, ...] = ("pts_backbone", "pts_neck", "img_backbone", "img_neck")


def _cast_floats(tree, dtype: torch.dtype):
    return tree_map(lambda x: x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x, tree)


def _half_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast_floats(args, torch.float16), _cast_floats(kwargs, torch.float16)


def _float_outputs(module: nn.Module, args: tuple, output):
    return _cast_floats(output, torch.float32)


def with_precision(detector: CmtDetector, precision: str) -> CmtDetector:
    """`detector` itself for fp32; for fp16 a copy whose :data:`HALF_MODULES` compute in float16 between casts
    of their inputs and outputs (the modules a model lacks, e.g. the camera branch of a LiDAR-only one, are
    skipped). Raises ValueError for another precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return detector
    half = copy.deepcopy(detector)
    for name in HALF_MODULES:
        try:
            module = half.get_submodule(name)
        except AttributeError:             # None or absent: the model has no such branch
            continue
        module.half()
        module.register_forward_pre_hook(_half_inputs, with_kwargs=True)
        module.register_forward_hook(_float_outputs)
    return half
