"""The onnx engine: an export folder run by onnxruntime behind the same pre- and post-processing as eager.

:class:`OnnxDetector` has CmtDetector's ``predict(batch)``, so the one prediction loop
(:func:`aqrcmt.eval.predict.predict_dataset`) and the pictures run it unchanged: per sample the LiDAR front end
(PyTorch + spconv) makes the dense BEV map, onnxruntime runs the graph, and
:func:`~aqrcmt.export.graph.finish_detections` keeps the boxes in range.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from aqrcmt.checkpoint.io import load_safetensors
from aqrcmt.export.bundle import ExportError, read_manifest, require_export_extra
from aqrcmt.export.graph import LidarFrontEnd, finish_detections
from aqrcmt.structures import Batch, Detections


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for a torch device name: CUDA first where asked for and present."""
    import onnxruntime

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ExportError(f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                              "(install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cpu_float16_fallbacks(path: Path) -> list[str]:
    """The op types of the ONNX model at `path` that take float16 inputs but have no float16 kernel in
    onnxruntime's CPU provider (its kernel registry): the CPU provider runs those in float32 between inserted
    casts, so an fp16 graph on the CPU computes them as fp32 ones and gains no speed."""
    import onnx
    from onnxruntime.capi import _pybind_state

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    dtypes = {value.name: value.type.tensor_type.elem_type
              for value in (*graph.value_info, *graph.input, *graph.output)}
    dtypes.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    half_ops = {node.op_type for node in graph.node
                if any(dtypes.get(name) == onnx.TensorProto.FLOAT16 for name in node.input)}
    cpu_half = {kernel.op_name for kernel in _pybind_state.get_all_opkernel_def()
                if kernel.provider == "CPUExecutionProvider" and kernel.domain in ("", "ai.onnx")
                and any("tensor(float16)" in types for types in kernel.type_constraints.values())}
    return sorted(half_ops - cpu_half)


class OnnxDetector(nn.Module):
    """An export folder (``aqrcmt export --format onnx``) as a detector: ``predict(batch) -> list[Detections]``.

    cfg: the exported model's ModelConfig (the manifest's config); batches of any size run sample by sample
    (the graph has batch 1), on `device` ("cpu" or "cuda"); threads: onnxruntime's intra-op threads (None: its
    default, one per core).
    """

    def __init__(self, directory: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        super().__init__()
        require_export_extra()
        import onnxruntime

        from aqrcmt.overrides import config_from_dict

        directory = Path(directory)
        self.manifest = read_manifest(directory)
        if "onnx" not in self.manifest["files"]:
            raise ExportError(f"{directory / 'manifest.json'}: field 'files' has no onnx model "
                              "(export with --format onnx or both)")
        self.config = config_from_dict(self.manifest["config"])
        self.cfg = self.config.model
        self.with_lidar, self.with_camera = self.cfg.lidar.enabled, self.cfg.camera.enabled
        self.front_end = None
        if self.with_lidar:
            self.front_end = LidarFrontEnd(self.cfg)
            tensors, _ = load_safetensors(directory / self.manifest["files"]["lidar_front_end"])
            self.front_end.load_state_dict(tensors)
            self.front_end.eval()
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        path = directory / self.manifest["files"]["onnx"]
        providers = providers_for(device)
        from onnxruntime.capi import onnxruntime_pybind11_state as status

        refusals = (status.Fail, status.InvalidGraph, status.InvalidProtobuf, status.InvalidArgument,
                    status.NotImplemented, status.EPFail, status.RuntimeException)
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except refusals as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"{path}: onnxruntime ({', '.join(providers)}) cannot run it: {reason}") from None
        self.img_shape = tuple(self.cfg.camera.image_size)

    @torch.no_grad()
    def graph_inputs(self, batch: Batch, b: int) -> dict[str, np.ndarray]:
        """The graph's inputs for sample `b` of `batch`: the front end's BEV map, the images (black when the batch
        has none, as the eager forward does) and lidar2img."""
        if self.with_camera and tuple(batch.img_shape) != self.img_shape:
            raise ExportError(f"the exported graph takes images of {self.img_shape} (H, W), the batch has "
                              f"{tuple(batch.img_shape)}")
        feeds = {}
        if self.with_lidar:
            feeds["bev"] = self.front_end([batch.points[b].cpu()]).numpy()
        if self.with_camera:
            images = batch.images[b:b + 1] if batch.images is not None else torch.zeros((1, 6, 3, *self.img_shape))
            feeds["images"] = images.float().cpu().numpy()
            feeds["lidar2img"] = batch.lidar2img[b:b + 1].double().cpu().numpy()
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The graph's outputs (scores, labels, boxes, query_scores, query_boxes; see DenseGraph) for inputs named
        as in the manifest."""
        return tuple(torch.from_numpy(array) for array in self.session.run(None, feeds))

    def predict(self, batch: Batch) -> list[Detections]:
        """Detections per sample of `batch` (boxes, scores, labels on the CPU)."""
        head = self.cfg.head
        detections = []
        for b in range(batch.batch_size):
            scores, labels, boxes, _, _ = self.run(self.graph_inputs(batch, b))
            detections.append(finish_detections(scores[0], labels[0], boxes[0],
                                                post_center_range=head.post_center_range,
                                                score_threshold=head.score_threshold))
        return detections
