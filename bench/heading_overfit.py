"""Can the tiny CMT fit heading at all? Train on a few fixed training samples and watch their yaw errors.

    python bench/heading_overfit.py --root DATA [--version v1.0-trainval] [--config tiny] [--samples 8]
        [--steps 400] [--every 200] [--augment] [--set KEY=VALUE ...]

The samples are every (len // samples)-th sample of the train split; the model is trained on them alone (AdamW at
the config's learning rate, no schedule, gradient clip 35, ModalMask3D off; the other training augmentations
only with --augment) and every `--every` steps its predictions on the same samples, without augmentation, are
matched to GT as in heading_check.py: matched boxes, mean and median yaw error, mean axis error (modulo pi).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from heading_check import prediction_errors

from aqrcmt.data import build_dataloader, build_dataset
from aqrcmt.models.detector import build_model
from aqrcmt.presets import load_config


def report(step: int, detector, loader) -> None:
    errors = np.concatenate(list(prediction_errors(detector, loader).values()) or [np.zeros(0)])
    if not len(errors):
        print(f"step {step}: no matched box")
        return
    axis = np.minimum(errors, np.pi - errors)
    print(f"step {step}: {len(errors)} matched boxes, yaw error mean {errors.mean():.2f} rad, median "
          f"{np.median(errors):.2f} rad, axis error mean {axis.mean():.2f} rad", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a synthetic benchmark (make-synthetic-nuscenes) with a train split")
    p.add_argument("--version", default="v1.0-trainval", help="its nuScenes version")
    p.add_argument("--config", default="tiny", help="preset")
    p.add_argument("--samples", type=int, default=8, help="training samples to fit")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--every", type=int, default=200, help="steps between two checks")
    p.add_argument("--augment", action="store_true", help="train with the config's augmentations")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"data.root={args.root}", f"data.version={args.version}", "data.train_split=train",
                                    "data.augment.modality_drop=false",
                                    *([] if args.augment else ["data.augment.enabled=false"]), *args.set])
    infos = build_dataset(cfg, "train", train=False).infos
    tokens = [info["token"] for info in infos[::max(1, len(infos) // args.samples)][:args.samples]]
    train_loader = build_dataloader(cfg, "train", train=True, samples=tokens)
    check_loader = build_dataloader(cfg, "train", train=False, samples=tokens)
    detector = build_model(cfg.model)
    optimizer = torch.optim.AdamW([q for q in detector.parameters() if q.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=0.01)
    step = 0
    while step < args.steps:
        for batch in train_loader:
            detector.train()
            loss = sum(detector.loss(batch).losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(detector.parameters(), 35.0)
            optimizer.step()
            step += 1
            if step % args.every == 0:
                report(step, detector, check_loader)
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
