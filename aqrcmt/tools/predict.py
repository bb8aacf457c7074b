"""``aqrcmt predict``: detections and pictures of a checkpoint on some samples of a split.

    aqrcmt predict --checkpoint runs/tiny/best --root data/nuscenes --split mini_val --samples 4 --out preds
    aqrcmt predict --checkpoint w.safetensors --info-pkl nuscenes_infos_val.pkl --root data/nuscenes \\
        --token 3e8750f331d7499e9b5123e9eb70f2e2 --out preds
    aqrcmt predict --engine onnx --model exported/tiny --root data/synthetic_nuscenes --out preds

writes ``OUT/results.json`` (the official submission format, every box; the evaluation's writer) and per sample
``OUT/<token>/bev.png``, ``cameras.png`` (with a camera branch) and ``aqr.png`` (with AQR, torch engine) showing
the predictions scoring at least ``--score-threshold``. Everything is written into a temporary folder next to OUT
that is renamed to OUT at the end, so a failed run leaves no half-written OUT.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader, Subset

from aqrcmt.atomic import staged_directory
from aqrcmt.config import Config
from aqrcmt.data.collate import collate
from aqrcmt.data.dataset import NuScenesDataset
from aqrcmt.data.loader import build_dataset
from aqrcmt.eval.nuscenes_eval import detections_to_results, write_results
from aqrcmt.eval.visualize import predict_with_pictures, save_png
from aqrcmt.models.detector import CmtDetector
from aqrcmt.overrides import apply_overrides
from aqrcmt.structures import Detections, SampleMeta
from aqrcmt.tools.checkpoint_options import add_config_arguments, load_checkpoint
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import add_out_option

if TYPE_CHECKING:
    from aqrcmt.export.runtime import OnnxDetector


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="aqrcmt weights: a .safetensors file or a checkpoint dir (engine torch)")
    parser.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                        help="torch: eager PyTorch; onnx: an `aqrcmt export` folder run by onnxruntime")
    parser.add_argument("--model", help="the `aqrcmt export` folder (engine onnx)")
    add_config_arguments(parser)
    parser.add_argument("--split", help="official split to read (default: the config's data.val_split)")
    parser.add_argument("--info-pkl", help="read the samples from this mmdet3d-format nuscenes_infos_*.pkl")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--samples", type=int, help="the first N samples of the split (default: all)")
    which.add_argument("--token", nargs="+", default=[], help="these sample tokens (default: all)")
    add_out_option(parser, "output folder (must not exist or be empty)", required=True)
    parser.add_argument("--score-threshold", type=float, default=0.3, help="lowest score drawn in the pictures")
    parser.add_argument("--device", default="cpu", help="torch device (e.g. cuda)")


def run(args: argparse.Namespace) -> int:
    out = _check_out(Path(args.out))
    cfg, detector = _load(args)
    dataset = _dataset(cfg)
    indices = _select(dataset, args.token, args.samples)
    written = _predict(detector, cfg, dataset, indices, out, args.device, args.score_threshold)
    print(f"{written} samples predicted: {out / 'results.json'} and pictures in {out}/<token>/")
    return 0


def _check_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"--out {out} exists and is not an empty folder; choose another or remove it")
    return out


def _load(args: argparse.Namespace) -> tuple[Config, CmtDetector | OnnxDetector]:
    """The checkpoint's config (:func:`load_checkpoint`) or the export's, reading --split / --info-pkl strictly,
    and its detector."""
    if args.engine == "onnx":
        cfg, detector = _load_export(args)
    elif args.checkpoint and not args.model:
        detector, cfg, _ = load_checkpoint(args.checkpoint, args)
    else:
        raise CommandError("--engine torch runs --checkpoint (not --model)")
    if args.split:
        cfg.data.val_split = args.split
    if args.info_pkl or args.split:
        cfg.data.info_pkl_val = args.info_pkl        # a stored config's pkl belongs to its own split
    cfg.data.on_bad_sample = "error"
    return cfg, detector


def _load_export(args: argparse.Namespace) -> tuple[Config, OnnxDetector]:
    """The export folder's detector and config, with --set, --root and --version applied."""
    if args.checkpoint or not args.model:
        raise CommandError("--engine onnx runs --model DIR, a folder written by `aqrcmt export` (not --checkpoint)")
    from aqrcmt.export.runtime import OnnxDetector

    detector = OnnxDetector(args.model, args.device)
    cfg = apply_overrides(detector.config, args.set)
    for field, value in (("root", args.root), ("version", args.version)):
        if value:
            setattr(cfg.data, field, value)
    return cfg, detector


def _dataset(cfg: Config) -> NuScenesDataset:
    try:
        return build_dataset(cfg, cfg.data.val_split, train=False)
    except (ValueError, FileNotFoundError) as error:    # root, version, split, info pkl
        raise CommandError(str(error)) from None


def _select(dataset: NuScenesDataset, tokens: list[str], samples: int | None) -> list[int]:
    """Dataset indices of `tokens` (in the order given), else of the first `samples` (default: all)."""
    if tokens:
        index = {info["token"]: i for i, info in enumerate(dataset.infos)}
        unknown = [t for t in tokens if t not in index]
        if unknown:
            raise CommandError(f"sample token(s) {unknown} are not in the split ({len(index)} samples of "
                               f"{dataset.root})")
        return [index[t] for t in dict.fromkeys(tokens)]
    if samples is not None and samples <= 0:
        raise CommandError(f"--samples must be > 0, got {samples}")
    return list(range(len(dataset)))[:samples]


def _predict(detector: CmtDetector | OnnxDetector, cfg: Config, dataset: NuScenesDataset, indices: list[int],
             out: Path, device: str, score_threshold: float) -> int:
    """Predict and draw into a temporary folder beside `out`, then rename it to `out`; returns the sample count."""
    with staged_directory(out, replace=False) as staging:
        def save(meta: SampleMeta, _: Detections, pictures: dict) -> None:
            for name, picture in pictures.items():
                save_png(picture, staging / meta.sample_token / f"{name}.png")

        loader = DataLoader(Subset(dataset, indices), batch_size=1, collate_fn=collate, num_workers=0)
        predictions = predict_with_pictures(detector, loader, device, on_sample=save,
                                            score_threshold=score_threshold)
        results = detections_to_results([d for _, d in predictions], [m for m, _ in predictions])
        write_results(results, staging / "results.json", use_camera=cfg.model.camera.enabled,
                      use_lidar=cfg.model.lidar.enabled)
    return len(predictions)
