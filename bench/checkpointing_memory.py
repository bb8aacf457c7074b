"""Activation checkpointing on the CPU: the peak memory of a training step with and without it, and the step time.

    python bench/checkpointing_memory.py --out bench/results/checkpointing_cpu.md     # default: the r50 preset

The step is the camera path of the detector's training step at the config's sizes, batch 1, fp32: the image
backbone on the six camera images (`build_image_backbone`, parameters trainable, BatchNorm as the config says), a
1x1 projection of its stride-16 map to the head's width, those tokens after random BEV tokens (the BEV map's size)
as the memory of the head's `Decoder` (900 + 300 queries), the mean of the decoder's outputs as the loss. Each
setting of `model.camera.checkpointing` / `model.head.checkpointing` runs in a fresh process: two steps; peak = the
process's peak resident memory (ru_maxrss) minus its resident memory before the first step; time = the second step.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.models.camera import build_image_backbone
from aqrcmt.models.transformer import Decoder
from aqrcmt.presets import load_config
from aqrcmt.training.memory import resident_bytes

SETTINGS = {"none": (False, False), "image backbone": (True, False), "decoder": (False, True),
            "both": (True, True)}            # name -> (model.camera.checkpointing, model.head.checkpointing)
DENOISING_QUERIES = 300                      # 10 groups x 30 GT, as the device check's kernel sizes


class CameraPath(nn.Module):
    """Image backbone -> 1x1 projection of the stride-16 map -> [BEV tokens, camera tokens] -> decoder."""

    def __init__(self, config: str, backbone_checkpointing: bool, decoder_checkpointing: bool) -> None:
        super().__init__()
        cfg = load_config(config)
        cfg.model.camera.checkpointing = backbone_checkpointing
        head = cfg.model.head
        self.backbone = build_image_backbone(cfg.model.camera)
        self.project = nn.Conv2d(cfg.model.camera.backbone_out_channels[0], head.hidden_dim, 1)
        self.decoder = Decoder(head.num_layers, head.hidden_dim, head.num_heads, head.ffn_dim, head.dropout,
                               decoder_checkpointing)
        bev_h, bev_w = cfg.model.bev_size
        image_h, image_w = cfg.model.camera.image_size
        tokens = bev_h * bev_w + 6 * (image_h // 16) * (image_w // 16)
        self.images = torch.randn(6, 3, image_h, image_w)
        self.bev = torch.randn(1, bev_h * bev_w, head.hidden_dim)
        self.key_pos = torch.randn(1, tokens, head.hidden_dim)
        self.query_pos = torch.randn(1, head.num_query + DENOISING_QUERIES, head.hidden_dim)
        for param in self.parameters():
            param.requires_grad_(True)

    def loss(self) -> torch.Tensor:
        camera = self.project(self.backbone(self.images)[0]).flatten(2).transpose(1, 2)     # (6, h w, C)
        memory = torch.cat([self.bev, camera.reshape(1, -1, camera.shape[-1])], dim=1)
        return self.decoder(self.query_pos, memory, self.key_pos).mean()


def worker(config: str, setting: str) -> dict:
    """Two training steps; the peak memory above the state before the first step and the second step's time."""
    torch.manual_seed(0)
    path = CameraPath(config, *SETTINGS[setting]).train()
    before = resident_bytes()
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        path.loss().backward()
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"checkpointing": setting, "peak_gib": (peak - before) / 2 ** 30, "step_s": seconds}


def markdown(config: str, rows: list[dict], command: str) -> str:
    base = rows[0]
    lines = [f"# Activation checkpointing, CPU, `{config}` (bench/checkpointing_memory.py)", "",
             f"The camera path of a training step (image backbone -> projection -> decoder; docstring of the "
             f"script), batch 1, fp32, {platform.machine()} CPU, torch {torch.__version__}, 1 intra-op thread. "
             f"Command: `{command}`. Peak: the worker process's peak resident memory above its memory before the "
             "first step (parameters and inputs excluded). Time: the second step.", "",
             "| checkpointing | peak (GiB) | saved | step (s) | time / none |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['checkpointing']} | {row['peak_gib']:.2f} | {1 - row['peak_gib'] / base['peak_gib']:.1%} "
                     f"| {row['step_s']:.1f} | {row['step_s'] / base['step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cmt_voxel0100_r50_800x320_cbgs", help="preset name or JSON config")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--worker", choices=SETTINGS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(worker(args.config, args.worker)))
        return 0
    rows = []
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--worker", setting],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: checkpointing {setting}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 2
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if args.out:
        command = " ".join(["python bench/checkpointing_memory.py", *(argv if argv is not None else sys.argv[1:])])
        atomic_write_bytes(args.out, markdown(args.config, rows, command).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
