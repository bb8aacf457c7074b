"""Router supervision: what each query's modality weights should be, given what the sample's sensors went through.

The targets come from the sample's :class:`aqrcmt.structures.SensorStates` (set by ModalMask3D, the failure
augmentation and the evaluation corruptions), per query and modality:

- LiDAR: 0 when the LiDAR was dropped; with a narrowed field of view, 0 for queries outside the sector that still
  returns points and 1 inside; 1 when intact; no target when degraded (fewer beams, failed objects, weather).
- Camera: 0 for every query when all views were dropped; otherwise 1 for a query that an intact view sees, 0 for
  one that only dropped views see (a dropped view touches only its queries); no target for queries no camera sees
  or that a degraded view sees without an intact one.

:func:`router_loss` is the auxiliary loss (``model.aqr.router_loss_weight``); :class:`RoutingEvidence` sums the
weights of failed and intact entries over an evaluation (does the router route?).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from aqrcmt.structures import SENSOR_DEGRADED, SENSOR_DROPPED, SENSOR_INTACT, SensorStates


class QueryRouting(NamedTuple):
    """The rendered queries' weights and where they are.

    lidar_weight, camera_weight: (B, Q); xy: (B, Q, 2) metres in the LiDAR frame; camera_visible: (B, Q, V) bool.
    """
    lidar_weight: Tensor
    camera_weight: Tensor
    xy: Tensor
    camera_visible: Tensor


class RoutingTargets(NamedTuple):
    """(B, Q) float 0/1 targets and (B, Q) bool masks of the entries that have one."""
    lidar: Tensor
    lidar_known: Tensor
    camera: Tensor
    camera_known: Tensor


def routing_targets(routing: QueryRouting, sensors: SensorStates) -> RoutingTargets:
    """Targets of every query (module docstring) from the batch's sensor states."""
    lidar_state = sensors.lidar.to(routing.xy.device).long()[:, None]                        # (B, 1)
    fov = sensors.lidar_fov.to(routing.xy)
    xy = routing.xy.detach()
    distance = xy.norm(dim=-1)
    cos_from_front = (xy * fov[:, None, :2]).sum(-1) / distance.clamp(min=1e-6)
    in_sector = (cos_from_front >= torch.cos(fov[:, None, 2])) | (distance < 1e-6)   # (B, Q); at the sensor: in
    lidar = ((lidar_state == SENSOR_INTACT) & in_sector).float()
    lidar_known = (lidar_state != SENSOR_DEGRADED).expand_as(lidar)

    views = sensors.views.to(routing.xy.device).long()[:, None, :]                            # (B, 1, V)
    visible = routing.camera_visible
    seen_intact = (visible & (views == SENSOR_INTACT)).any(-1)
    seen_dropped = (visible & (views == SENSOR_DROPPED)).any(-1)
    seen_degraded = (visible & (views == SENSOR_DEGRADED)).any(-1)
    all_dropped = (views == SENSOR_DROPPED).all(-1).expand_as(seen_intact)
    camera = seen_intact.float()
    camera_known = all_dropped | seen_intact | (seen_dropped & ~seen_degraded)
    return RoutingTargets(lidar, lidar_known, camera, camera_known)


def router_loss(routing: QueryRouting, sensors: SensorStates) -> Tensor:
    """Mean squared error between the weights and their targets over the entries that have one (0-d fp32)."""
    targets = routing_targets(routing, sensors)
    squared = torch.cat([((routing.lidar_weight.float() - targets.lidar) ** 2)[targets.lidar_known],
                         ((routing.camera_weight.float() - targets.camera) ** 2)[targets.camera_known]])
    return squared.sum() / max(squared.numel(), 1)


class RoutingEvidence:
    """Sums of the query weights by modality and target (failed: target 0, intact: target 1) over batches."""

    def __init__(self) -> None:
        self.sums = {(m, t): 0.0 for m in ("lidar", "camera") for t in ("failed", "intact")}
        self.counts = dict.fromkeys(self.sums, 0)

    def add(self, routing: QueryRouting, sensors: SensorStates) -> None:
        targets = routing_targets(routing, sensors)
        for modality, weight, target, known in (
                ("lidar", routing.lidar_weight, targets.lidar, targets.lidar_known),
                ("camera", routing.camera_weight, targets.camera, targets.camera_known)):
            for name, value in (("failed", 0.0), ("intact", 1.0)):
                chosen = known & (target == value)
                self.sums[modality, name] += float(weight.detach()[chosen].float().sum())
                self.counts[modality, name] += int(chosen.sum())

    def summary(self) -> dict[str, float | None]:
        """{"<modality>_<failed|intact>": mean weight (None without such entries), "..._count": entries}."""
        out: dict[str, float | None] = {}
        for (modality, name), total in self.sums.items():
            count = self.counts[modality, name]
            out[f"{modality}_{name}"] = total / count if count else None
            out[f"{modality}_{name}_count"] = count
        return out
