"""CmtDetector: LiDAR branch + camera branch + CMT head, assembled from a typed :class:`ModelConfig`.

Data flow for a batch of B samples (shapes for the released vov config):

    points  list of B (N_i, 5) -> pts_voxel_layer -> pts_voxel_encoder (mean) -> pts_middle_encoder (sparse, fp32)
            -> dense BEV (B, 256, 180, 180) -> pts_backbone (SECOND) -> pts_neck (SECONDFPN) -> (B, 512, 180, 180)
    images  (B, 6, 3, H, W) -> (6B, 3, H, W) sample-major -> grid_mask (training) -> img_backbone -> img_neck
            -> level 0 (6B, 256, H/16, W/16)
    both    -> pts_bbox_head -> per-layer box/class predictions -> loss (training) or Detections (eval)

Submodule names are the official state_dict prefixes, so an official checkpoint maps onto this module by
name. The variable-size parts (voxelization, VFE, sparse encoder, densify; denoising-query preparation from
the GT) run eagerly (`torch.compiler.disable`); `compile_dense()` compiles everything else in place, and the
compiled graphs are reused across batches with different point, voxel and GT counts (same GT bucket).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from aqrcmt.config import ModelConfig
from aqrcmt.models.camera import build_image_backbone, build_image_neck
from aqrcmt.models.cmt_head import CmtHead
from aqrcmt.models.denoising import Denoising, prepare_denoising
from aqrcmt.models.freezing import FreezableModule
from aqrcmt.models.grid_mask import GridMask
from aqrcmt.models.second import SECOND, SECONDFPN
from aqrcmt.models.sparse_encoder import SparseEncoder
from aqrcmt.models.voxelize import HardSimpleVFE, HardVoxelizer
from aqrcmt.structures import Batch, Detections


class LossOutput(NamedTuple):
    """What :meth:`CmtDetector.loss` returns (a NamedTuple, so DDP and torch.compile pass it through)."""
    losses: dict[str, Tensor]                 # name -> fp32 scalar, already weighted; the total is their sum
    monitor: Optional[dict[str, float]]       # AQR health signals of a monitored forward, else None


# Submodules that see only fixed-shape dense tensors (for a fixed batch and image size).
DENSE_MODULES: tuple[str, ...] = ("pts_backbone", "pts_neck", "pts_bbox_head", "img_backbone", "img_neck")


class CmtDetector(FreezableModule):
    """The CMT detector (fusion, LiDAR-only or camera-only, by `cfg.lidar.enabled` / `cfg.camera.enabled`);
    ``freeze(prefixes)`` freezes parts by their state_dict prefix (models/freezing.py)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.with_lidar = cfg.lidar.enabled
        self.with_camera = cfg.camera.enabled
        # Construction order = official state_dict order: pts_* modules, head, then img_*.
        if self.with_lidar:
            self.pts_voxel_layer = HardVoxelizer.from_config(cfg.lidar.voxel)
            self.pts_voxel_encoder = HardSimpleVFE(cfg.lidar.in_channels)
            self.pts_middle_encoder = SparseEncoder.from_config(cfg.lidar)
            self.pts_backbone = SECOND.from_config(cfg.lidar, in_channels=self.pts_middle_encoder.bev_channels)
            self.pts_neck = SECONDFPN.from_config(cfg.lidar)
        self.pts_bbox_head = CmtHead(cfg.head, pc_range=cfg.lidar.voxel.point_cloud_range, bev_size=cfg.bev_size,
                                     with_lidar=self.with_lidar, with_camera=self.with_camera,
                                     aqr=cfg.aqr if cfg.aqr.enabled else None)
        if self.with_camera:
            self.img_backbone = build_image_backbone(cfg.camera)
            self.img_neck = build_image_neck(cfg.camera)
            self.grid_mask = GridMask(prob=cfg.camera.grid_mask_prob) if cfg.camera.grid_mask else None

    # ------------------------------------------------------------------------------------------------------
    # Feature extraction
    # ------------------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def sparse_bev(self, points: list[Tensor]) -> Tensor:
        """Voxelize, average and sparse-encode: list of B (N_i, C) clouds -> dense BEV (B, C_bev, H, W) fp32.

        Runs eagerly under torch.compile (spconv cannot be traced; voxel counts vary per batch).
        """
        voxels = self.pts_voxel_layer(points)
        features = self.pts_voxel_encoder(voxels.voxels, voxels.num_points)
        return self.pts_middle_encoder(features, voxels.coors, voxels.batch_size)

    @torch.compiler.disable
    def prepare_denoising(self, batch: Batch) -> Optional[Denoising]:
        """Denoising queries from the batch's GT (None without GT or with `use_dn` off).

        Built eagerly and handed to the head, so the head's compiled graph sees only the GT-bucket-sized
        reference points and attention mask, never the varying GT count.
        """
        head = self.pts_bbox_head
        if not head.cfg.use_dn:
            return None
        return prepare_denoising(batch.gt_boxes, batch.gt_labels, cfg=head.cfg, pc_range=head.pc_range)

    def extract_pts_feat(self, points: list[Tensor]) -> Tensor:
        """list of B (N_i, C) point clouds -> BEV features (B, sum(neck_out_channels), H, W)."""
        if not self.with_lidar:
            raise RuntimeError("extract_pts_feat: this model was built with the LiDAR branch disabled")
        return self.pts_neck(self.pts_backbone(self.sparse_bev(points)))

    def extract_img_feat(self, images: Tensor) -> Tensor:
        """(B, V, 3, H, W) normalised images -> stride-16 features (B * V, neck_out_channels, H/16, W/16).

        Row b * V + v holds camera v of sample b. GridMask is applied in training mode only.
        """
        if not self.with_camera:
            raise RuntimeError("extract_img_feat: this model was built with the camera branch disabled")
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, V, 3, H, W), got shape {tuple(images.shape)}")
        x = images.flatten(0, 1)
        if self.grid_mask is not None and self.training:
            x = self.grid_mask(x)
        return self.img_neck(self.img_backbone(x))[0]

    def compile_dense(self, **compile_kwargs) -> None:
        """torch.compile the dense submodules in place (`nn.Module.compile`: state_dict keys stay unchanged).

        The sparse part stays eager, so varying voxel counts never trigger a recompile.
        """
        for name in DENSE_MODULES:
            module = getattr(self, name, None)
            if module is not None:
                module.compile(**compile_kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict:
        """Head outputs for `batch`. In training mode the GT boxes also feed the denoising queries.

        `batch.images = None` on a model with cameras is treated like the camera-drop augmentation: all-zero
        images (the projection matrices `batch.lidar2img` are still required).
        """
        lidar2img = batch.lidar2img if self.with_camera else None
        if self.with_camera and lidar2img is None:
            raise ValueError("batch.lidar2img is None: the camera branch needs the (B, 6, 4, 4) projections")
        bev_feat = self.extract_pts_feat(batch.points) if self.with_lidar else None
        img_feat = None
        if self.with_camera:
            images = batch.images
            if images is None:
                images = lidar2img.new_zeros((*lidar2img.shape[:2], 3, *batch.img_shape), dtype=torch.float32)
            img_feat = self.extract_img_feat(images)
        dn = self.prepare_denoising(batch) if self.training else None
        return self.pts_bbox_head(bev_feat, img_feat, lidar2img, batch.img_shape, dn=dn)

    def loss(self, batch: Batch, monitor: bool = False) -> LossOutput:
        """Forward + head losses (fp32 scalars, already weighted; the total is their sum).

        monitor: also measure the AQR health signals of this forward (``LossOutput.monitor``; None without
        AQR or with monitor False). Only this forward is monitored.
        """
        aqr = self.pts_bbox_head.aqr
        with aqr.monitoring(monitor) if aqr is not None else contextlib.nullcontext():
            outputs = self(batch)
        losses = self.pts_bbox_head.loss(outputs, batch.gt_boxes, batch.gt_labels, batch.sensors)
        stats = dict(aqr.last_stats) if monitor and aqr is not None else None
        return LossOutput({name: value.float() for name, value in losses.items()}, stats)

    def predict(self, batch: Batch) -> list[Detections]:
        """Decoded detections per sample (call in eval mode, under torch.no_grad / inference_mode)."""
        return self.pts_bbox_head.decode(self(batch))


def build_model(cfg: ModelConfig) -> CmtDetector:
    """Build the detector of `cfg` with freshly initialised weights."""
    return CmtDetector(cfg)

