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
        self.session = onnxruntime.InferenceSession(str(directory / self.manifest["files"]["onnx"]), options,
                                                    providers=providers_for(device))
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
