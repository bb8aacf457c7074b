"""Can the tiny LiDAR branch learn front from back, or motion, when told directly? Dense supervision alone.

    python bench/bev_heading_probe.py --root DATA [--version v1.0-trainval] [--config tiny] [--steps 1200]
        [--every 300] [--target heading|velocity] [--set KEY=VALUE ...]

A fresh LiDAR branch of the config (voxelize -> sparse encoder -> SECOND -> FPN) and a two-layer conv
(3 x 3 to 64 channels, ReLU, 1 x 1 to 2) are trained on one loss only: the L1 between the map, read bilinearly at
each GT box's centre, and the box's target: (sin, cos) of the yaw of each vehicle (car, truck, bus, construction
vehicle, trailer; `--target heading`), or (vx, vy) in m/s of every box (`--target velocity`: the multi-sweep
points show how an object moved). The training pipeline with its augmentations (ModalMask3D off), AdamW at lr
2e-4, batch of the config. Every `--every` steps the map is read at the val boxes' centres: for heading the yaw
error, axis error (modulo pi) and the share with the front right (error < 90 degrees); for velocity the error
(m/s) against predicting zero, and for the boxes moving faster than 1 m/s also the share whose direction is within
90 degrees and the mean predicted speed.
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


def read_at_boxes(bev_map: torch.Tensor, batch, pc_range, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, H, W) map -> its values at the centres of the batch's boxes (n, 2) and their targets (n, 2):
    (sin, cos) of the vehicles' yaws, or (vx, vy) of every box."""
    read, targets = [bev_map.new_zeros(0, 2)], [bev_map.new_zeros(0, 2)]
    for b, (boxes, labels) in enumerate(zip(batch.gt_boxes, batch.gt_labels)):
        if target == "heading":
            boxes = boxes[torch.isin(labels, VEHICLES)]
            targets.append(torch.stack([torch.sin(boxes[:, 6]), torch.cos(boxes[:, 6])], -1))
        else:
            targets.append(boxes[:, 7:9])
        read.append(read_bev_map(bev_map[b:b + 1], boxes[None, :, :2], pc_range)[0])
    return torch.cat(read), torch.cat(targets)


def score(model, branch, loader, pc_range, target: str) -> str:
    model.eval()
    with torch.no_grad():
        pairs = [read_at_boxes(branch(model.extract_pts_feat(batch.points)), batch, pc_range, target)
                 for batch in loader]
    model.train()
    read, truth = torch.cat([r for r, _ in pairs]), torch.cat([t for _, t in pairs])
    if target == "velocity":
        error, speed = (read - truth).norm(dim=-1), truth.norm(dim=-1)
        moving = speed > 1.0
        agree = (read[moving] * truth[moving]).sum(-1) > 0
        return (f"{len(truth)} val boxes: velocity error {error.mean():.2f} m/s (predicting zero: {speed.mean():.2f}); "
                f"{int(moving.sum())} moving > 1 m/s: error {error[moving].mean():.2f} (zero: "
                f"{speed[moving].mean():.2f}), direction within 90 degrees {agree.float().mean():.0%}, predicted "
                f"speed {read[moving].norm(dim=-1).mean():.2f} m/s")
    yaw = torch.atan2(truth[:, 0], truth[:, 1])
    error = (torch.remainder(torch.atan2(read[:, 0], read[:, 1]) - yaw + np.pi, 2 * np.pi) - np.pi).abs()
    return (f"{len(yaw)} val vehicles: yaw error {error.mean():.2f} rad, axis error "
            f"{torch.minimum(error, np.pi - error).mean():.2f} rad, "
            f"front right {(error < np.pi / 2).float().mean():.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a synthetic benchmark (make-synthetic-nuscenes)")
    p.add_argument("--version", default="v1.0-trainval", help="its nuScenes version (train / val splits)")
    p.add_argument("--config", default="tiny", help="preset whose LiDAR branch and data pipeline are used")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--target", choices=("heading", "velocity"), default="heading", help="what the map learns")
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
            read, truth = read_at_boxes(branch(model.extract_pts_feat(batch.points)), batch, pc_range, args.target)
            if not len(truth):
                continue
            loss = (read - truth).abs().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 35.0)
            optimizer.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                report = score(model, branch, val, pc_range, args.target)
                print(f"step {step} ({time.perf_counter() - start:.0f} s): {report}", flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
