"""The part of CmtDetector that export can take as one graph, the part it cannot, and the two exporters.

    points (N, 5) --LidarFrontEnd (eager: voxelize, VFE, spconv)--> bev (1, C_bev, H, W)  [outside the graph]
    bev, images (1, 6, 3, H_img, W_img), lidar2img (1, 6, 4, 4) float64
        --DenseGraph: SECOND + FPN, camera backbone + CP-FPN, CMT head (+ AQR), top-k box decoding-->
        scores (1, K), labels (1, K) int64, boxes (1, K, 9)                                  [the graph]
        (+ query_scores, query_boxes of every query, for comparing runtimes)
    boxes inside post_center_range and above score_threshold --finish_detections--> Detections  [outside]

The LiDAR front end stays a PyTorch/spconv module: voxel counts vary per sample and spconv's gather/scatter
rules are built at run time (TensorRT deployments replace this part with plugins). The last filter keeps a
data-dependent number of boxes, so it runs after the graph too.

The AQR ops (``torch.ops.aqrcmt.splat`` / ``modulate``) are decomposed into standard ATen ops before saving
(:func:`decompositions`): splat into its separable PyTorch path (index_add / scatter_reduce, convolutions),
modulate into a product; the inverse of the 4 x 4 projections is traced as the closed-form adjugate
(:class:`ClosedFormInverse`). The ONNX graph so holds only the standard ONNX domain.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from aqrcmt.config import ModelConfig
from aqrcmt.kernels.modulate_cpu import modulate_forward_torch
from aqrcmt.kernels.splat_cpu import splat_forward_separable
from aqrcmt.kernels.splat_params import SplatParams
from aqrcmt.models.bbox_coder import decode_codes, oriented_box_codes, select_topk
from aqrcmt.models.detector import CmtDetector
from aqrcmt.models.sparse_encoder import SparseEncoder
from aqrcmt.models.voxelize import HardSimpleVFE, HardVoxelizer
from aqrcmt.structures import Detections

OUTPUT_NAMES: tuple[str, ...] = ("scores", "labels", "boxes", "query_scores", "query_boxes")
FRONT_END_MODULES: tuple[str, ...] = ("pts_voxel_layer", "pts_voxel_encoder", "pts_middle_encoder")


class LidarFrontEnd(nn.Module):
    """Voxelization + mean VFE + spconv sparse encoder: list of B (N_i, 5) clouds -> dense BEV (B, C, H, W) fp32.

    The submodule names are the detector's, so the detector's ``pts_voxel_*`` / ``pts_middle_encoder.*`` keys
    load into it unchanged.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pts_voxel_layer = HardVoxelizer.from_config(cfg.lidar.voxel)
        self.pts_voxel_encoder = HardSimpleVFE(cfg.lidar.in_channels)
        self.pts_middle_encoder = SparseEncoder.from_config(cfg.lidar)

    def forward(self, points: list[Tensor]) -> Tensor:
        return CmtDetector.sparse_bev(self, points)      # the detector's own front end, on these submodules


def front_end_state(detector: CmtDetector) -> dict[str, Tensor]:
    """The state_dict entries of `detector`'s LiDAR front end (what :class:`LidarFrontEnd` loads)."""
    return {key: value for key, value in detector.state_dict().items() if key.split(".")[0] in FRONT_END_MODULES}


class DenseGraph(nn.Module):
    """What is exported: the detector after the dense BEV map, for batch 1 and the config's image size.

    forward(*inputs) takes the tensors named by :func:`input_specs` (bev and/or images + lidar2img) and returns
    scores (1, K) sigmoid, labels (1, K) int64 and boxes (1, K, 9) of the K = min(max_num, Nq * classes) best
    (query, class) pairs of the last decoder layer, best first, and the same for every query: query_scores
    (1, Nq, classes), query_boxes (1, Nq, 9). Boxes are gravity-centre boxes in the LiDAR frame. The per-query
    outputs compare two runtimes without the top-k's order among equal scores (random weights and empty inputs
    give many).
    """

    def __init__(self, detector: CmtDetector) -> None:
        super().__init__()
        self.detector = detector
        self.img_shape = tuple(detector.cfg.camera.image_size)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        det = self.detector
        named = dict(zip((spec["name"] for spec in input_specs(det)), inputs))
        bev_feat = det.pts_neck(det.pts_backbone(named["bev"])) if det.with_lidar else None
        img_feat = det.extract_img_feat(named["images"]) if det.with_camera else None
        outputs = det.pts_bbox_head(bev_feat, img_feat, named.get("lidar2img"), self.img_shape)
        logits, codes = outputs["cls_logits"][-1, 0].float(), oriented_box_codes(outputs)[-1, 0].float()
        scores, labels, query = select_topk(logits, det.cfg.head.max_num)
        boxes = decode_codes(codes)
        return scores[None], labels[None], boxes[query][None], logits.sigmoid()[None], boxes[None]


def input_specs(detector: CmtDetector) -> list[dict]:
    """Name, shape, dtype and meaning of each graph input of `detector` (batch 1)."""
    specs = []
    if detector.with_lidar:
        encoder = detector.pts_middle_encoder
        specs.append({"name": "bev", "shape": [1, encoder.bev_channels, *encoder.bev_shape], "dtype": torch.float32,
                      "meaning": "dense BEV map of the LiDAR front end (voxelize + mean VFE + spconv encoder)"})
    if detector.with_camera:
        specs.append({"name": "images", "shape": [1, 6, 3, *detector.cfg.camera.image_size], "dtype": torch.float32,
                      "meaning": "the six normalised camera images (B, V, 3, H, W), CAMERA_NAMES order"})
        specs.append({"name": "lidar2img", "shape": [1, 6, 4, 4], "dtype": torch.float64,
                      "meaning": "LiDAR metres -> image pixels of each camera, image augmentation included"})
    return specs


def finish_detections(scores: Tensor, labels: Tensor, boxes: Tensor, *, post_center_range: tuple[float, ...],
                      score_threshold: Optional[float]) -> Detections:
    """The filter after the graph (one sample): the top-k boxes whose centre lies in `post_center_range`
    (x_min, y_min, z_min, x_max, y_max, z_max, metres) and, with a threshold, whose score exceeds it.

    scores (K,), labels (K,), boxes (K, 9): the graph's outputs of one sample; the same rule as
    :func:`aqrcmt.models.bbox_coder.decode_detections` applies after its top-k.
    """
    limits = boxes.new_tensor(post_center_range)
    keep = ((boxes[:, :3] >= limits[:3]) & (boxes[:, :3] <= limits[3:])).all(dim=1)
    if score_threshold is not None:
        keep &= scores > score_threshold
    return Detections(boxes=boxes[keep], scores=scores[keep], labels=labels[keep])


# ------------------------------------------------------------------------------------------------------------------
# Decompositions: the custom ops and the matrix inverse as standard ATen ops
# ------------------------------------------------------------------------------------------------------------------
def inverse_4x4(m: Tensor) -> Tensor:
    """Inverse of (..., 4, 4) matrices by the adjugate: cofactors from the 2 x 2 minors of the top and bottom row
    pairs (Laplace expansion), divided by the determinant. Plain products, so it exports to any runtime."""
    a = [[m[..., i, j] for j in range(4)] for i in range(4)]
    s = [a[0][0] * a[1][1] - a[1][0] * a[0][1], a[0][0] * a[1][2] - a[1][0] * a[0][2],
         a[0][0] * a[1][3] - a[1][0] * a[0][3], a[0][1] * a[1][2] - a[1][1] * a[0][2],
         a[0][1] * a[1][3] - a[1][1] * a[0][3], a[0][2] * a[1][3] - a[1][2] * a[0][3]]
    c = [a[2][0] * a[3][1] - a[3][0] * a[2][1], a[2][0] * a[3][2] - a[3][0] * a[2][2],
         a[2][0] * a[3][3] - a[3][0] * a[2][3], a[2][1] * a[3][2] - a[3][1] * a[2][2],
         a[2][1] * a[3][3] - a[3][1] * a[2][3], a[2][2] * a[3][3] - a[3][2] * a[2][3]]
    det = s[0] * c[5] - s[1] * c[4] + s[2] * c[3] + s[3] * c[2] - s[4] * c[1] + s[5] * c[0]
    rows = [
        [a[1][1] * c[5] - a[1][2] * c[4] + a[1][3] * c[3], -a[0][1] * c[5] + a[0][2] * c[4] - a[0][3] * c[3],
         a[3][1] * s[5] - a[3][2] * s[4] + a[3][3] * s[3], -a[2][1] * s[5] + a[2][2] * s[4] - a[2][3] * s[3]],
        [-a[1][0] * c[5] + a[1][2] * c[2] - a[1][3] * c[1], a[0][0] * c[5] - a[0][2] * c[2] + a[0][3] * c[1],
         -a[3][0] * s[5] + a[3][2] * s[2] - a[3][3] * s[1], a[2][0] * s[5] - a[2][2] * s[2] + a[2][3] * s[1]],
        [a[1][0] * c[4] - a[1][1] * c[2] + a[1][3] * c[0], -a[0][0] * c[4] + a[0][1] * c[2] - a[0][3] * c[0],
         a[3][0] * s[4] - a[3][1] * s[2] + a[3][3] * s[0], -a[2][0] * s[4] + a[2][1] * s[2] - a[2][3] * s[0]],
        [-a[1][0] * c[3] + a[1][1] * c[1] - a[1][2] * c[0], a[0][0] * c[3] - a[0][1] * c[1] + a[0][2] * c[0],
         -a[3][0] * s[3] + a[3][1] * s[1] - a[3][2] * s[0], a[2][0] * s[3] - a[2][1] * s[1] + a[2][2] * s[0]],
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2) / det[..., None, None]


class ClosedFormInverse(TorchFunctionMode):
    """While active, ``torch.linalg.inv`` of 4 x 4 matrices runs :func:`inverse_4x4` (ATen's inverse traces to an
    LU solve plus an effectful error check, which ONNX has no op for)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.linalg.inv and args[0].shape[-2:] == (4, 4) and not kwargs:
            return inverse_4x4(args[0])
        return func(*args, **(kwargs or {}))


def _splat(weights: Tensor, coords: Tensor, valid: Tensor, *params) -> tuple[Tensor, Tensor, Tensor]:
    return splat_forward_separable(weights, coords, valid, SplatParams(*params))


def decompositions() -> dict:
    """The decomposition table of the export: the core ATen table plus the AQR ops."""
    table = torch.export.default_decompositions()
    table[torch.ops.aqrcmt.splat.default] = _splat
    table[torch.ops.aqrcmt.modulate.default] = modulate_forward_torch
    return table


# ------------------------------------------------------------------------------------------------------------------
# The exporters
# ------------------------------------------------------------------------------------------------------------------
def example_inputs(detector: CmtDetector) -> tuple[Tensor, ...]:
    """Inputs of the graph's shapes for tracing: zero features, and a ring of six level cameras for lidar2img."""
    from aqrcmt.data.synthetic_batch import camera_ring

    return tuple(camera_ring(tuple(detector.cfg.camera.image_size))[None] if spec["name"] == "lidar2img"
                 else torch.zeros(spec["shape"], dtype=spec["dtype"]) for spec in input_specs(detector))


def sample_inputs(detector: CmtDetector, seed: int = 0) -> tuple[Tensor, ...]:
    """The graph inputs of one synthetic sample (``synthetic_batch``: 6 boxes on ground points, random images),
    the BEV map made by `detector`'s own LiDAR front end."""
    from aqrcmt.data.synthetic_batch import synthetic_batch

    batch = synthetic_batch(detector.cfg, batch_size=1, num_boxes=(6,), seed=seed)
    with torch.no_grad():
        return tuple(detector.sparse_bev(batch.points) if spec["name"] == "bev"
                     else getattr(batch, spec["name"]).to(spec["dtype"]) for spec in input_specs(detector))


def max_differences(expected: tuple[Tensor, ...], got: tuple[Tensor, ...]) -> dict[str, float]:
    """Largest |difference| between two sets of graph outputs over every query and class: ``scores`` (of
    query_scores), ``boxes`` (of query_boxes: m, rad, m/s) and ``boxes_relative`` (divided by max(1, |value|))."""
    box = (expected[4].float() - got[4].float()).abs()
    return {"scores": (expected[3].float() - got[3].float()).abs().max().item(), "boxes": box.max().item(),
            "boxes_relative": (box / expected[4].float().abs().clamp(min=1.0)).max().item()}


def export_program(detector: CmtDetector) -> torch.export.ExportedProgram:
    """torch.export of :class:`DenseGraph` (CPU, eval mode, batch 1), decomposed to standard ATen ops."""
    detector = detector.cpu().eval()
    with torch.no_grad(), ClosedFormInverse():
        program = torch.export.export(DenseGraph(detector), example_inputs(detector), strict=False)
    return program.run_decompositions(decompositions())


def export_onnx(program: torch.export.ExportedProgram, detector: CmtDetector, opset: int):
    """The ONNX model (an ``onnx.ModelProto``, standard domain only) of an :func:`export_program` result."""
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False,
                                     input_names=[spec["name"] for spec in input_specs(detector)],
                                     output_names=list(OUTPUT_NAMES))
    return onnx_program.model_proto
