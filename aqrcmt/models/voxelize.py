"""Hard voxelization of point clouds and the mean voxel feature encoder (HardSimpleVFE).

Semantics follow the official `SPConvVoxelization` (spconv-2 `PointToVoxel` on the CPU):

* voxel index of a point = floor((p - range_min) / voxel_size) per axis, computed in float32; points whose index
  falls outside [0, grid) on any axis are dropped, with grid = round((range_max - range_min) / voxel_size);
* voxels are numbered in order of their first point in the input; only the first `max_voxels` voxels are kept;
* each voxel keeps its first `max_points` points in input order (the rest are dropped), zero padded.

Everything is vectorised (sort / unique / scatter), so it runs on any device without a per-point loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aqrcmt.config import VoxelConfig


@dataclass
class Voxels:
    """A batch of voxelized point clouds.

    voxels:     (M, max_points, C) float32, points of each voxel, zero padded.
    num_points: (M,) int32, number of valid points per voxel (1..max_points).
    coors:      (M, 4) int32, (batch index, z, y, x) voxel indices.
    batch_size: number of samples B (samples may have no voxel).
    """
    voxels: Tensor
    num_points: Tensor
    coors: Tensor
    batch_size: int


class HardVoxelizer(nn.Module):
    """Parameter-free hard voxelizer (the official `pts_voxel_layer`).

    Args:
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) in metres.
        voxel_size: (dx, dy, dz) in metres.
        max_points: points kept per voxel.
        max_voxels: (train, test) caps on the number of voxels per sample; picked by `self.training`.
    """

    def __init__(self, point_cloud_range: tuple[float, ...], voxel_size: tuple[float, ...], max_points: int,
                 max_voxels: tuple[int, int]) -> None:
        super().__init__()
        if len(point_cloud_range) != 6 or len(voxel_size) != 3:
            raise ValueError(f"point_cloud_range needs 6 values and voxel_size 3, got {point_cloud_range}, "
                             f"{voxel_size}")
        self.max_points = int(max_points)
        self.max_voxels = (int(max_voxels[0]), int(max_voxels[1]))
        # Explicit CPU device: the grid size is computed here even when the model is built under a meta device.
        range_min = torch.tensor(point_cloud_range[:3], dtype=torch.float32, device="cpu")
        range_max = torch.tensor(point_cloud_range[3:], dtype=torch.float32, device="cpu")
        size = torch.tensor(voxel_size, dtype=torch.float32, device="cpu")
        # (x, y, z) number of voxels, computed like spconv: round((max - min) / size) in float32.
        self.grid_size: tuple[int, int, int] = tuple(int(v) for v in torch.round((range_max - range_min) / size))
        # Non-persistent buffers: follow .to(device) but stay out of the state_dict (the official layer has none).
        self.register_buffer("range_min", range_min, persistent=False)
        self.register_buffer("voxel_size", size, persistent=False)

    @classmethod
    def from_config(cls, cfg: VoxelConfig) -> "HardVoxelizer":
        return cls(cfg.point_cloud_range, cfg.voxel_size, cfg.max_points_per_voxel,
                   (cfg.max_voxels_train, cfg.max_voxels_test))

    def voxelize_one(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Voxelize one cloud (N, C) -> voxels (M, max_points, C), coors_zyx (M, 3) int32, num_points (M,) int32."""
        if points.dim() != 2 or points.shape[1] < 3:
            raise ValueError(f"points must have shape (N, C>=3), got {tuple(points.shape)}")
        max_voxels = self.max_voxels[0] if self.training else self.max_voxels[1]
        num_channels = points.shape[1]
        grid = torch.tensor(self.grid_size, device=points.device)

        # Voxel index (x, y, z) of every point; same float32 arithmetic as spconv.
        xyz = points[:, :3].float()
        index_xyz = torch.floor((xyz - self.range_min) / self.voxel_size).long()
        inside = ((index_xyz >= 0) & (index_xyz < grid)).all(dim=1)
        point_ids = torch.nonzero(inside).squeeze(1)                      # input order of the kept points
        index_xyz = index_xyz[point_ids]
        nx, ny, _ = self.grid_size
        linear = (index_xyz[:, 2] * ny + index_xyz[:, 1]) * nx + index_xyz[:, 0]

        # Number voxels by their first point: unique -> first point id of each unique voxel -> rank.
        unique_linear, inverse = torch.unique(linear, return_inverse=True)
        first_point = torch.full((unique_linear.numel(),), linear.numel(), dtype=torch.long, device=points.device)
        first_point.scatter_reduce_(0, inverse, torch.arange(linear.numel(), device=points.device), reduce="amin")
        order = torch.argsort(first_point)                                 # unique slot -> voxel number
        voxel_of_slot = torch.empty_like(order)
        voxel_of_slot[order] = torch.arange(order.numel(), device=points.device)
        voxel_id = voxel_of_slot[inverse]                                  # voxel number of each kept point

        # Slot of each point inside its voxel = its rank among that voxel's points (input order).
        sorted_voxel, perm = torch.sort(voxel_id, stable=True)
        counts = torch.bincount(sorted_voxel, minlength=order.numel())
        starts = torch.cumsum(counts, 0) - counts
        slot_sorted = torch.arange(sorted_voxel.numel(), device=points.device) - starts[sorted_voxel]
        slot = torch.empty_like(slot_sorted)
        slot[perm] = slot_sorted

        num_voxels = min(order.numel(), max_voxels)
        keep = (voxel_id < num_voxels) & (slot < self.max_points)
        voxels = points.new_zeros((num_voxels, self.max_points, num_channels))
        voxels[voxel_id[keep], slot[keep]] = points[point_ids[keep]]
        num_points = counts[:num_voxels].clamp(max=self.max_points).int()
        linear_of_voxel = unique_linear[order[:num_voxels]]
        coors_zyx = torch.stack([linear_of_voxel // (nx * ny), (linear_of_voxel // nx) % ny, linear_of_voxel % nx],
                                dim=1).int()
        return voxels, coors_zyx, num_points

    @torch.no_grad()
    def forward(self, points: list[Tensor]) -> Voxels:
        """Voxelize a batch: list of B clouds (N_i, C) -> concatenated voxels with (b, z, y, x) coors."""
        if len(points) == 0:
            raise ValueError("points must be a non-empty list of (N_i, C) tensors")
        all_voxels, all_coors, all_num = [], [], []
        for b, cloud in enumerate(points):
            voxels, coors_zyx, num_points = self.voxelize_one(cloud)
            batch_col = torch.full((coors_zyx.shape[0], 1), b, dtype=torch.int32, device=coors_zyx.device)
            all_voxels.append(voxels)
            all_coors.append(torch.cat([batch_col, coors_zyx], dim=1))
            all_num.append(num_points)
        return Voxels(torch.cat(all_voxels), torch.cat(all_num), torch.cat(all_coors), batch_size=len(points))


class HardSimpleVFE(nn.Module):
    """Mean of the valid points of each voxel: (M, P, C), (M,) -> (M, num_features). No parameters."""

    def __init__(self, num_features: int = 5) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, voxels: Tensor, num_points: Tensor) -> Tensor:
        # Padding rows are zero, so the sum over all P slots is the sum over the valid points.
        summed = voxels[:, :, :self.num_features].sum(dim=1)
        return summed / num_points.to(voxels.dtype).clamp(min=1).unsqueeze(1)
