"""Can the tiny LiDAR branch learn front from back when told directly? Dense heading supervision alone.

    python bench/bev_heading_probe.py --root DATA [--version v1.0-trainval] [--config tiny] [--steps 1200]
        [--every 300] [--set KEY=VALUE ...]

A fresh LiDAR branch of the config (voxelize -> sparse encoder -> SECOND -> FPN) and a two-layer conv
(3 x 3 to 64 channels, ReLU, 1 x 1 to 2) are trained on one loss only: the L1 between the map's (sin, cos), read
bilinearly at each GT vehicle's centre (car, truck, bus, construction vehicle, trailer), and (sin, cos) of its yaw;
the training pipeline with its augmentations (ModalMask3D off), AdamW at lr 2e-4, batch of the config. Every
`--every` steps the map is read at the val vehicles' centres: yaw error, axis error (modulo pi) and the share with
the front right (error < 90 degrees).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aqrcmt.data import build_dataloader
from aqrcmt.models.detector import build_model
from aqrcmt.models.position_encoding import read_bev_map
from aqrcmt.presets import load_config
from aqrcmt.structures import CLASS_NAMES

VEHICLES = torch.tensor([CLASS_NAMES.index(n) for n in ("car", "truck", "bus", "construction_vehicle", "trailer")])


def read_at_vehicles(heading_map: torch.Tensor, batch, pc_range) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, H, W) map -> its (sin, cos) at the batch's vehicle centres (n, 2) and their yaws (n,)."""
    read, yaws = [heading_map.new_zeros(0, 2)], [heading_map.new_zeros(0)]
    for b, (boxes, labels) in enumerate(zip(batch.gt_boxes, batch.gt_labels)):
        boxes = boxes[torch.isin(labels, VEHICLES)]
        read.append(read_bev_map(heading_map[b:b + 1], boxes[None, :, :2], pc_range)[0])
        yaws.append(boxes[:, 6])
    return torch.cat(read), torch.cat(yaws)


def score(model, branch, loader, pc_range) -> str:
    model.eval()
    with torch.no_grad():
        pairs = [read_at_vehicles(branch(model.extract_pts_feat(batch.points)), batch, pc_range) for batch in loader]
    model.train()
    read, yaw = torch.cat([r for r, _ in pairs]), torch.cat([y for _, y in pairs])
    error = (torch.remainder(torch.atan2(read[:, 0], read[:, 1]) - yaw + np.pi, 2 * np.pi) - np.pi).abs()
    return (f"{len(yaw)} val vehicles: yaw error {error.mean():.2f} rad, axis error "
            f"{torch.minimum(error, np.pi - error).mean():.2f} rad, front right {(error < np.pi / 2).float().mean():.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a synthetic benchmark (make-synthetic-nuscenes)")
    p.add_argument("--version", default="v1.0-trainval", help="its nuScenes version (train / val splits)")
    p.add_argument("--config", default="tiny", help="preset whose LiDAR branch and data pipeline are used")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--set", nargs="*", default=[], help="config overrides")
    args = p.parse_args()
    torch.manual_seed(0)
    splits = ("mini_train", "mini_val") if args.version == "v1.0-mini" else ("train", "val")
    cfg = load_config(args.config, [f"data.root={args.root}", f"data.version={args.version}",
                                    f"data.train_split={splits[0]}", f"data.val_split={splits[1]}",
                                    "model.camera.enabled=false", "data.augment.modality_drop=false", *args.set])
    model = build_model(cfg.model)
    pc_range = cfg.model.lidar.voxel.point_cloud_range
    branch = torch.nn.Sequential(torch.nn.Conv2d(sum(cfg.model.lidar.neck_out_channels), 64, 3, padding=1),
                                 torch.nn.ReLU(), torch.nn.Conv2d(64, 2, 1))
    params = [*(p for n, p in model.named_parameters() if n.startswith("pts_") and "bbox_head" not in n),
              *branch.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    train, val = build_dataloader(cfg, splits[0], train=True), build_dataloader(cfg, splits[1], train=False)
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in train:
            read, yaw = read_at_vehicles(branch(model.extract_pts_feat(batch.points)), batch, pc_range)
            if not len(yaw):
                continue
            loss = (read - torch.stack([torch.sin(yaw), torch.cos(yaw)], -1)).abs().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 35.0)
            optimizer.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                print(f"step {step} ({time.perf_counter() - start:.0f} s): {score(model, branch, val, pc_range)}",
                      flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
