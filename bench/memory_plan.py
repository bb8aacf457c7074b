"""The memory plan of a training step, by module, for the released presets (CPU, batch 1), and its GPU estimate.

    python bench/memory_plan.py --out bench/results/memory_plan_cpu.md --cache bench/results/memory_plan_cpu

The step is bench/bench_train.py's: ``LossModel`` forward with the losses, backward, gradient clipping, AdamW step
(``freeze_and_build_optimizer``: what the preset freezes stays frozen), fp32, batch 1, built directly as a Batch
(`full_size_batch`: 262,144 points over 10 sweeps, 30 GT boxes, six random images at the config's size). Each
preset (and each checkpointing setting) runs in a fresh process under an address-space limit (``--limit-gib``):
two steps; the ledger (aqrcmt/training/memory.py) counts the second step's saved-for-backward bytes by module;
peak = the process's peak resident memory (ru_maxrss) minus its resident memory before the first step; time = the
second step. Then one forward under CPU autocast (bfloat16) is counted the same way with the saved tensors dropped
(the 16-bit plan). A preset whose step does not fit the limit is counted by forward only (fp32 and bf16, saved
tensors dropped), without a measured peak.
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

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.config import ModelConfig
from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.structures import Batch
from aqrcmt.training.loop import LossModel
from aqrcmt.training.memory import (DETECTOR, LOSSES, MODULE_GROUPS, SavedTensorLedger, resident_bytes,
                                   state_bytes_by_group)
from aqrcmt.training.optim import freeze_and_build_optimizer

POINTS = 262_144                 # about 10 nuScenes sweeps
SWEEPS = 10
GT_BOXES = 30
POINTS_PER_BOX = 1_000
# measured preset -> the released presets with the same modules, sizes and frozen parts (only AQR options differ)
PRESETS = {
    "cmt_voxel0100_r50_800x320_cbgs": (),
    "cmt_aqr_recommended_voxel0100_r50_800x320_cbgs": ("cmt_aqr_voxel0100_r50_800x320_cbgs",),
    "cmt_lidar_voxel0075_cbgs": (),
    "cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs": ("cmt_aqr_voxel0075_vov_1600x640_cbgs",
                                                        "cmt_aqr_fork_original_voxel0075_vov_1600x640_cbgs"),
    "cmt_voxel0075_vov_1600x640_cbgs": (),
    "cmt_camera_vov_1600x640_cbgs": (),
}
SETTINGS = {"plain": [], "camera ckpt": ["model.camera.checkpointing=true"],
            "head ckpt": ["model.head.checkpointing=true"],
            "camera + head ckpt": ["model.camera.checkpointing=true", "model.head.checkpointing=true"]}
GROUPS = tuple(dict.fromkeys(group for _, group in MODULE_GROUPS)) + (DETECTOR, LOSSES)
GIB, MIB = 2 ** 30, 2 ** 20
ADAM_STATES = 2                  # exp_avg, exp_avg_sq per trainable parameter (fp32)
CPU_MATH_ATTENTION_SAVES = 3     # (heads, Nq, Nq) fp32 matrices the CPU's masked self-attention keeps per layer


def full_size_batch(cfg: ModelConfig, batch_size: int = 1, seed: int = 0) -> Batch:
    """`batch_size` samples of POINTS points (GT_BOXES boxes' surfaces + ground) with the time lags of SWEEPS sweeps."""
    batch = synthetic_batch(cfg, batch_size, num_boxes=(GT_BOXES,) * batch_size, points_per_box=POINTS_PER_BOX,
                            num_ground_points=POINTS - GT_BOXES * POINTS_PER_BOX, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for points in batch.points:
        points[:, 4] = torch.randint(0, SWEEPS, (points.shape[0],), generator=generator) * 0.05   # 20 Hz sweeps
    return batch


def cpu_attention_bytes(cfg: ModelConfig) -> int:
    """Bytes per sample of the attention matrices the CPU's masked self-attention (math path) saves, fp32 also
    under autocast, which CUDA's memory-efficient attention does not keep: 3 x layers x heads x Nq^2 x 4."""
    head = cfg.head
    queries = head.num_query + (head.dn_scalar * GT_BOXES if head.use_dn else 0)
    return CPU_MATH_ATTENTION_SAVES * head.num_layers * head.num_heads * queries ** 2 * 4


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    tensors = [*batch.points, *batch.gt_boxes, *batch.gt_labels]
    return tensors + [t for t in (batch.images, batch.lidar2img) if t is not None]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo) and the logical core count."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {len(names)} logical cores"


def counted_forward(model: LossModel, batch: Batch, dtype: torch.dtype) -> dict[str, int]:
    """Saved bytes by group of one forward with the losses, saved tensors dropped (fp32, or CPU autocast `dtype`)."""
    with SavedTensorLedger(model.detector, batch_tensors(batch), keep=False) as ledger, \
            torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model(batch)
    return ledger.bytes_by_group()


def worker(preset: str, setting: str, forward_only: bool) -> dict:
    """One preset and checkpointing setting in this process (module docstring)."""
    cfg = load_config(preset, SETTINGS[setting])
    torch.manual_seed(0)
    detector = build_model(cfg.model).train()
    optimizer = freeze_and_build_optimizer(detector, cfg.optim)
    model = LossModel(detector)
    batch = full_size_batch(cfg.model)
    result = {"preset": preset, "setting": setting, "state": state_bytes_by_group(detector),
              "points": sum(p.shape[0] for p in batch.points)}
    if forward_only:
        result["saved_fp32"] = counted_forward(model, batch, torch.float32)
    else:
        before = resident_bytes()
        for _ in range(2):
            start = time.perf_counter()
            with SavedTensorLedger(detector, batch_tensors(batch)) as ledger:
                losses = model(batch).losses
            result["saved_fp32"] = ledger.bytes_by_group()      # held by the graph as the backward starts
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(detector.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result["step_s"] = time.perf_counter() - start
            del losses
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if setting == "plain":
        result["saved_bf16"] = counted_forward(model, batch, torch.bfloat16)
    return result


def run_worker(preset: str, setting: str, forward_only: bool, limit_gib: float) -> tuple[Optional[dict], str]:
    """The worker in a fresh process under `limit_gib` of address space: (its result or None, its last error line)."""
    command = ["prlimit", f"--as={int(limit_gib * GIB)}", sys.executable, __file__, "--worker", preset,
               "--setting", setting] + (["--forward-only"] if forward_only else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def measure(preset: str, setting: str, limit_gib: float, cache: Optional[Path]) -> dict:
    """A cached result, or the step (falling back to the forward alone when the step does not fit)."""
    path = cache / f"{preset}__{'_'.join(setting.replace('+', ' ').split())}.json" if cache else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    result, error = run_worker(preset, setting, False, limit_gib)
    if result is None:
        print(f"{preset} {setting}: the step failed ({error}); counting the forward only", flush=True)
        result, error2 = run_worker(preset, setting, True, limit_gib)
        if result is None:
            raise RuntimeError(f"{preset} {setting}: the forward failed too: {error2}")
        result["step_error"] = error
    if path is not None:
        atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    return result


def model_state(result: dict) -> tuple[int, int]:
    """(parameter bytes, gradient + AdamW bytes) of the whole model."""
    params = sum(entry["params"] for entry in result["state"].values())
    trainable = sum(entry["trainable"] for entry in result["state"].values())
    return params, trainable * (1 + ADAM_STATES)


def gpu_estimate(result: dict, batch_size: int) -> tuple[float, bool]:
    """GiB per GPU at `batch_size` under bf16/fp16 autocast, and whether the backward's transient is included.

    params (fp32) + gradients and AdamW state (fp32) + batch_size x (the 16-bit saved bytes without the CPU-only
    attention matrices + the measured fp32 transient of the backward scaled by the 16-bit/fp32 ratio of the saved
    bytes, both without those matrices).
    """
    params, state = model_state(result)
    attention = cpu_attention_bytes(load_config(result["preset"]).model)
    saved32 = sum(result["saved_fp32"].values())
    saved16 = sum(result["saved_bf16"].values()) - attention
    transient = 0.0
    if "peak_bytes" in result:
        transient = max(0.0, result["peak_bytes"] - state - saved32) * saved16 / (saved32 - attention)
    return (params + state + batch_size * (saved16 + transient)) / GIB, "peak_bytes" in result


def by_module_table(result: dict, variants: dict[str, dict]) -> list[str]:
    header = "| module | params (MiB) | grads + AdamW (MiB) | saved fp32 (MiB) | saved bf16 autocast (MiB) |"
    header += "".join(f" saved, {name} (MiB) |" for name in variants)
    lines = [header, "|" + "---|" * (5 + len(variants))]
    totals = [0.0] * (4 + len(variants))
    for group in GROUPS:
        state = result["state"].get(group, {"params": 0, "trainable": 0})
        cells = [state["params"] / MIB, state["trainable"] * (1 + ADAM_STATES) / MIB,
                 result["saved_fp32"].get(group, 0) / MIB, result["saved_bf16"].get(group, 0) / MIB]
        cells += [variant["saved_fp32"].get(group, 0) / MIB for variant in variants.values()]
        if not any(cells) and group != "voxelization":
            continue
        totals = [a + b for a, b in zip(totals, cells)]
        lines.append(f"| {group} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{c:,.0f}**" for c in totals) + " |")
    return lines


def markdown(results: dict[str, dict], checkpointing: dict[str, dict[str, dict]], command: str,
             limit_gib: float) -> str:
    lines = ["# Memory plan of a training step, CPU (bench/memory_plan.py)", "",
             f"Command: `{command}`. CPU: {cpu_model()}, "
             f"torch {torch.__version__}, one intra-op thread, each run in a fresh process limited to "
             f"{limit_gib:g} GiB of address space. Batch 1, fp32, {POINTS:,} points ({SWEEPS} sweeps), "
             f"{GT_BOXES} GT boxes, six random images at the preset's size; the method is the script's docstring. "
             "Saved = bytes autograd holds for the backward when it starts, by the module that saved them, each "
             "storage once (parameters, buffers and the batch excluded). Peak = peak resident memory above the "
             "resident memory before the first step (parameters and batch excluded).", ""]
    lines += ["## Whole step", "",
              "| preset (same plan) | params (GiB) | grads + AdamW (GiB) | saved fp32 (GiB) | parts: grads + AdamW + "
              "saved (GiB) | measured peak (GiB) | second step (s) |", "|---|---|---|---|---|---|---|"]
    for preset, result in results.items():
        params, state = model_state(result)
        saved = sum(result["saved_fp32"].values())
        same = ", ".join(f"`{name}`" for name in PRESETS[preset])
        peak = f"{result['peak_bytes'] / GIB:.2f}" if "peak_bytes" in result else "not measured"
        step = f"{result['step_s']:.0f}" if "step_s" in result else "-"
        lines.append(f"| `{preset}`{' (' + same + ')' if same else ''} | {params / GIB:.2f} | {state / GIB:.2f} | "
                     f"{saved / GIB:.2f} | {(state + saved) / GIB:.2f} | {peak} | {step} |")
    for preset, result in results.items():
        if "step_error" in result:
            lines += ["", f"`{preset}`: the step did not fit ({result['step_error']}); its saved bytes are counted "
                          "on a forward alone with the saved tensors dropped."]
    lines += ["", "## GPU estimate per GPU, bf16 / fp16 autocast (GiB)", "",
              "params + grads + AdamW (fp32) + batch x (saved under autocast, less the decoder's self-attention "
              "matrices that only the CPU's math path keeps, + the backward's transient: measured peak - parts, "
              "scaled by the autocast/fp32 ratio of the saved bytes); no CUDA context or allocator cache. bf16 and "
              "fp16 autocast put the same ops in 16 bit, so the bytes are the same.", "",
              "| preset | batch 1 | batch 2 | batch 3 | batch 4 |", "|---|---|---|---|---|"]
    for preset, result in results.items():
        cells = []
        for batch_size in range(1, 5):
            estimate, with_transient = gpu_estimate(result, batch_size)
            cells.append(f"{estimate:.1f}" + ("" if with_transient else " (no transient: lower bound)"))
        lines.append(f"| `{preset}` | " + " | ".join(cells) + " |")
    for preset, result in results.items():
        variants = checkpointing.get(preset, {})
        lines += ["", f"## By module: `{preset}`", ""] + by_module_table(result, variants)
        if variants:
            base = result
            lines += ["", "| setting | saved fp32 (GiB) | measured peak (GiB) | peak saved | step / plain |",
                      "|---|---|---|---|---|"]
            for name, variant in {"plain": base, **variants}.items():
                saved = sum(variant["saved_fp32"].values()) / GIB
                if "peak_bytes" not in variant:
                    lines.append(f"| {name} | {saved:.2f} | did not fit {limit_gib:g} GiB | - | - |")
                elif "peak_bytes" not in base:
                    lines.append(f"| {name} | {saved:.2f} | {variant['peak_bytes'] / GIB:.2f} | plain did not fit "
                                 f"| - ({variant['step_s']:.0f} s) |")
                else:
                    lines.append(f"| {name} | {saved:.2f} | {variant['peak_bytes'] / GIB:.2f} | "
                                 f"{1 - variant['peak_bytes'] / base['peak_bytes']:.1%} | "
                                 f"{variant['step_s'] / base['step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--checkpointing", nargs="*", choices=PRESETS,
                        default=["cmt_voxel0100_r50_800x320_cbgs", "cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs",
                                 "cmt_voxel0075_vov_1600x640_cbgs", "cmt_camera_vov_1600x640_cbgs"],
                        help="presets also measured with model.camera / model.head checkpointing (each alone; "
                             "where the plain step does not fit: the camera's alone and both)")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="address-space limit of each run (GiB)")
    parser.add_argument("--cache", type=Path, default=None, help="keep each run's JSON here and reuse it")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here")
    parser.add_argument("--worker", choices=PRESETS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(worker(args.worker, args.setting, args.forward_only)))
        return 0
    results, checkpointing = {}, {}
    try:
        for preset in args.presets:
            results[preset] = measure(preset, "plain", args.limit_gib, args.cache)
            print(preset, "plain done", flush=True)
            if preset in args.checkpointing:
                # each option alone; where the plain step does not fit, the backbone's option alone and both
                fits = "peak_bytes" in results[preset]
                settings = ("camera ckpt", "head ckpt") if fits else ("camera ckpt", "camera + head ckpt")
                checkpointing[preset] = {setting: measure(preset, setting, args.limit_gib, args.cache)
                                         for setting in settings}
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        command = " ".join(["python bench/memory_plan.py", *(argv if argv is not None else sys.argv[1:])])
        atomic_write_bytes(args.out, markdown(results, checkpointing, command, args.limit_gib).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
