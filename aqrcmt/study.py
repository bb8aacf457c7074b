"""The AQR fine-tuning study: does AQR keep a pretrained CMT's accuracy, and which AQR settings collapse it?

    run_study(StudyPlan(out=Path("study")))       # `aqrcmt study --out study [--quick]`

1. The synthetic benchmark (train scenes / held-out val scenes) is written to ``out/data``.
2. A plain tiny CMT is pretrained on the train scenes, written in the official ``.pth`` layout and brought back
   with the converter (``out/pretrained``): the path a user takes with the released weights.
3. Every arm fine-tunes that model for the same number of steps with the same seed, data order and the AQR fork's
   learning-rate multipliers (frozen backbones): plain CMT continued (the control), the fork's original AQR, the
   fix its training report proposes, the recommended AQR, and the recommended AQR with denoising queries rendered.
4. Each arm is evaluated on the val scenes (official DetectionEval) at 0, 1/4, 1/2 and all of its budget, and its
   AQR health signals are measured on val batches at the same checkpoints.
5. ``out/report.md``, ``out/map_vs_step.png`` and each arm's rendered maps summarise it.

Finished pieces are kept: re-running on a partly done ``out`` resumes (the benchmark, the pretrained weights and
every finished arm are reused; an unfinished arm restarts).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.checkpoint.convert import convert
from aqrcmt.checkpoint.weights import AQR_PREFIX, load_weights
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader
from aqrcmt.data.splits import TRAIN_VAL_SPLITS
from aqrcmt.data.synthetic import make_synthetic_nuscenes
from aqrcmt.eval.visualize import render_aqr, save_png
from aqrcmt.inference import load_detector_from_checkpoint
from aqrcmt.models import build_model
from aqrcmt.presets import AQR_FORK_LR_MULTS, MAIN_JOB_BENCHMARK, MAIN_JOB_STEPS, SyntheticBenchmark, load_config
from aqrcmt.training.loop import TrainOptions, train


@dataclass(frozen=True)
class Arm:
    """One fine-tuning run: a preset and the overrides that make it differ from the others."""
    name: str
    preset: str
    description: str
    overrides: tuple[str, ...] = ()


ARMS: tuple[Arm, ...] = (
    Arm("control", "tiny", "plain CMT, fine-tuned on (no AQR)"),
    Arm("fork_original", "tiny_aqr_fork_original",
        "the fork's collapsed run: tanh, sum kernel s2, /max over views, invisible at (0,0), DN rendered, "
        "min-max, additive r 0.1"),
    Arm("report_fix", "tiny_aqr", "the report's fix: sum kernel s1, threshold 0.01, clamp 1.5, additive r 0.7"),
    Arm("recommended", "tiny_aqr_recommended", "recommended: normalized kernel s2 (fill 1), convex r 0.5"),
    Arm("recommended_dn_rendered", "tiny_aqr_recommended", "recommended, denoising queries rendered too",
        ("model.aqr.render_dn_queries=true",)),
)
ARM_NAMES = tuple(arm.name for arm in ARMS)


@dataclass(frozen=True)
class StudyPlan:
    """What the study runs. Steps are optimizer steps; the same for every arm."""
    out: Path
    arms: tuple[str, ...] = ARM_NAMES
    benchmark: SyntheticBenchmark = MAIN_JOB_BENCHMARK
    pretrain_steps: int = MAIN_JOB_STEPS
    finetune_steps: int = 200
    finetune_lr: float = 2e-4            # the fork's base learning rate, with its multipliers
    eval_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    signal_batches: int = 4              # val batches whose AQR signals are averaged at each evaluation
    seed: int = 0

    @classmethod
    def quick(cls, out: Path, arms: tuple[str, ...] = ARM_NAMES) -> "StudyPlan":
        """Every arm for a few steps on a small benchmark: the end-to-end check (minutes)."""
        return cls(out=out, arms=arms, benchmark=SyntheticBenchmark("v1.0-mini", scenes=3, samples_per_scene=2, seed=0),
                   pretrain_steps=4, finetune_steps=4, signal_batches=1)

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARM_NAMES]
        if unknown:
            raise ValueError(f"unknown study arm(s) {unknown}; known arms: {list(ARM_NAMES)}")
        if self.finetune_steps < 4 or self.pretrain_steps < 1:
            raise ValueError(f"finetune_steps must be >= 4 and pretrain_steps >= 1, got {self.finetune_steps}, "
                             f"{self.pretrain_steps}")


@dataclass
class ArmResult:
    name: str
    description: str
    evaluations: list[dict] = field(default_factory=list)   # {step, mAP, NDS, signals, loss}

    @property
    def before(self) -> dict:
        return self.evaluations[0]

    @property
    def after(self) -> dict:
        return self.evaluations[-1]


# ------------------------------------------------------------------------------------------------------
# The phases
# ------------------------------------------------------------------------------------------------------
def run_study(plan: StudyPlan, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the study of `plan`; returns the path of report.md."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    data_root = prepare_benchmark(plan, log)
    weights, pretrain_cfg = pretrain(plan, data_root, log)
    results = [finetune_arm(plan, arm, data_root, weights, log) for arm in ARMS if arm.name in plan.arms]
    return write_report(plan, pretrain_cfg, results)


def prepare_benchmark(plan: StudyPlan, log: Callable[[str], None]) -> Path:
    root = plan.out / "data"
    if not (root / plan.benchmark.version / "sample.json").is_file():
        log(f"[study] writing the synthetic benchmark to {root}")
        make_synthetic_nuscenes(root, **asdict(plan.benchmark))
    return root


def _base_overrides(plan: StudyPlan, data_root: Path, run_dir: Path) -> list[str]:
    train_split, val_split = TRAIN_VAL_SPLITS[plan.benchmark.version]
    return [f"data.root={data_root}", f"data.version={plan.benchmark.version}", f"data.train_split={train_split}",
            f"data.val_split={val_split}", f"train.output_dir={run_dir}", f"train.seed={plan.seed}",
            "train.epochs=100000", "train.eval_every_epochs=0"]


def pretrain(plan: StudyPlan, data_root: Path, log: Callable[[str], None]) -> tuple[Path, Config]:
    """Plain tiny CMT on the train scenes -> official .pth layout -> converted back to safetensors."""
    run_dir, folder = plan.out / "pretrain", plan.out / "pretrained"
    official, converted = folder / "cmt_tiny_official.pth", folder / "cmt_tiny.safetensors"
    cfg_path = run_dir / "config.json"
    if converted.is_file() and cfg_path.is_file():
        cfg = load_config(str(cfg_path))
        load_weights(build_model(cfg.model), converted, missing_ok_prefixes=())   # CheckpointError if it does not fit
        log(f"[study] reusing the pretrained model {converted}")
        return converted, cfg
    if run_dir.exists():
        shutil.rmtree(run_dir)                       # an unfinished pretraining restarts
    cfg = load_config("tiny", [*_base_overrides(plan, data_root, run_dir), f"train.max_steps={plan.pretrain_steps}"])
    log(f"[study] pretraining plain tiny CMT for {plan.pretrain_steps} steps in {run_dir}")
    result = train(cfg, TrainOptions())
    folder.mkdir(parents=True, exist_ok=True)
    for path in (official, converted):
        path.unlink(missing_ok=True)
    convert(result.last_checkpoint / "model.safetensors", official, str(cfg_path), reverse=True)
    convert(official, converted, str(cfg_path))
    log(f"[study] pretrained weights: {official} (official layout) -> {converted}")
    return converted, cfg


def finetune_arm(plan: StudyPlan, arm: Arm, data_root: Path, weights: Path,
                 log: Callable[[str], None]) -> ArmResult:
    """Fine-tune one arm from `weights` and evaluate it at plan.eval_fractions of its budget."""
    run_dir = plan.out / "arms" / arm.name
    done = run_dir / "arm_result.json"
    if done.is_file():
        log(f"[study] arm {arm.name}: finished earlier, reusing {done}")
        return ArmResult(**json.loads(done.read_text()))
    if run_dir.exists():
        shutil.rmtree(run_dir)                       # an unfinished arm restarts
    steps = plan.finetune_steps
    eval_steps = sorted({round(f * steps) for f in plan.eval_fractions})
    every = max(1, eval_steps[1] if len(eval_steps) > 1 else steps)
    with_aqr = load_config(arm.preset, list(arm.overrides)).model.aqr.enabled
    lr_mults = json.dumps({k: v for k, v in AQR_FORK_LR_MULTS.items() if with_aqr or not (k + ".").startswith(AQR_PREFIX)})
    cfg = load_config(arm.preset, [*_base_overrides(plan, data_root, run_dir), f"train.max_steps={steps}",
                                   f"optim.lr={plan.finetune_lr}", f"optim.lr_mults={lr_mults}",
                                   # every epoch end saves too: keep them all, the evaluated ones are among them
                                   f"train.checkpoint_every_steps={every}", "train.keep_last=100000",
                                   *arm.overrides])
    log(f"[study] arm {arm.name} ({arm.description}): {steps} steps from {weights}")
    final = train(cfg, TrainOptions(load_from=str(weights)))       # evaluates its last step itself
    result = ArmResult(arm.name, arm.description)
    for step in eval_steps:
        metrics = final.metrics if step == steps else None
        result.evaluations.append(evaluate_step(cfg, run_dir, step, weights, plan.signal_batches, metrics))
        e = result.evaluations[-1]
        log(f"[study] arm {arm.name} step {step}: mAP {e['mAP']:.4f} NDS {e['NDS']:.4f}")
    atomic_write_bytes(done, json.dumps(asdict(result), indent=1).encode())
    return result


def evaluate_step(cfg: Config, run_dir: Path, step: int, weights: Path, signal_batches: int,
                  metrics: Optional[dict] = None) -> dict:
    """Official metrics (unless given), val loss and AQR signals of the arm's model after `step` steps."""
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    if metrics is None:
        eval_dir = run_dir / "eval" / f"step_{step:08d}"
        options = TrainOptions(eval_only=True, load_from=str(weights)) if step == 0 else \
            TrainOptions(eval_only=True, resume=str(checkpoint))
        eval_cfg = load_config(str(run_dir / "config.json"), [f"train.output_dir={eval_dir}", "train.tracker=none"])
        metrics = train(eval_cfg, options).metrics
    signals, loss = measure_signals(cfg, weights if step == 0 else checkpoint / "model.safetensors",
                                    signal_batches, image=run_dir / "maps" / f"step_{step:08d}.png")
    return {"step": step, "mAP": metrics["mAP"], "NDS": metrics["NDS"], "loss": loss, "signals": signals}


# ------------------------------------------------------------------------------------------------------
# Measurements beyond mAP/NDS, and the report
# ------------------------------------------------------------------------------------------------------
# Signals of the report's debug table, per modality (monitor names): weight mean -> map mean / max -> change.
TABLE_SIGNALS = ("weight_mean", "map_mean", "map_max", "relative_change", "energy_retention")


def measure_signals(cfg: Config, weights: Path, num_batches: int,
                    image: Optional[Path] = None) -> tuple[dict[str, float], float]:
    """(AQR health signals averaged over `num_batches` val batches ({} without AQR), mean val loss).

    The model is in eval mode (no denoising queries); `image`: where to draw the last batch's weight maps.
    """
    detector, _ = load_detector_from_checkpoint(weights, cfg=cfg, missing_ok_prefixes=(AQR_PREFIX,))
    with_aqr = detector.pts_bbox_head.aqr is not None
    totals: dict[str, float] = {}
    losses = []
    with torch.no_grad():
        for index, batch in enumerate(build_dataloader(cfg, cfg.data.val_split, train=False)):
            if index >= num_batches:
                break
            output = detector.loss(batch, monitor=with_aqr)
            losses.append(float(sum(output.losses.values())))
            for key, value in (output.monitor or {}).items():
                totals[key] = totals.get(key, 0.0) + float(value)
    if with_aqr and image is not None:
        save_png(render_aqr(detector.pts_bbox_head.aqr.monitor.last_view), image)
    count = max(len(losses), 1)
    return {k: v / count for k, v in totals.items()}, sum(losses) / count


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def pretrained_metrics(plan: StudyPlan) -> dict:
    """Val metrics of the pretrained model (the pretraining run's final evaluation)."""
    return json.loads((plan.out / "pretrain" / "metrics_history.json").read_text())[-1]


def _relative(value: float, reference: float) -> str:
    return f"{(value - reference) / reference:+.1%}" if reference > 0 else "n/a"


def report_markdown(plan: StudyPlan, pretrain_cfg: Config, pretrained: dict, results: list[ArmResult]) -> str:
    """The report: the fork report's first table (before/after per arm, change vs the pretrained model) and its
    debug table (signals). `pretrained`: the pretrained model's val metrics (mAP, NDS)."""
    benchmark = plan.benchmark
    lines = [
        "# AQR fine-tuning study", "",
        f"Benchmark: synthetic nuScenes {benchmark.version}, {benchmark.scenes} scenes x "
        f"{benchmark.samples_per_scene} samples (seed {benchmark.seed}); scored on the val scenes with the official "
        "DetectionEval.",
        f"Pretrained: plain `{pretrain_cfg.name}` CMT, {plan.pretrain_steps} steps, written as an official `.pth` and "
        "converted back. Every arm: the same seed and data order, "
        f"{plan.finetune_steps} steps at lr {plan.finetune_lr:g} with the AQR fork's multipliers (backbones frozen).",
        f"Pretrained model on val: mAP {pretrained['mAP']:.4f}, NDS {pretrained['NDS']:.4f}. 'Before' is each arm "
        "at step 0 (the pretrained weights with the arm's AQR switched on).",
        "", "## Accuracy before and after fine-tuning", "",
        _table_row(["arm", "settings", "mAP before", "mAP after", "after vs pretrained", "NDS before", "NDS after",
                    "val loss before", "val loss after"]),
        _table_row(["---"] * 9),
    ]
    for r in results:
        b, a = r.before, r.after
        lines.append(_table_row([r.name, r.description, f"{b['mAP']:.4f}", f"{a['mAP']:.4f}",
                                 _relative(a["mAP"], pretrained["mAP"]), f"{b['NDS']:.4f}", f"{a['NDS']:.4f}",
                                 f"{b['loss']:.3f}", f"{a['loss']:.3f}"]))
    lines += ["", "## mAP at 0, 1/4, 1/2 and all of the budget", "",
              _table_row(["arm", *[f"step {e['step']}" for e in results[0].evaluations]]),
              _table_row(["---"] * (1 + len(results[0].evaluations)))]
    for r in results:
        lines.append(_table_row([r.name, *[f"{e['mAP']:.4f}" for e in r.evaluations]]))
    lines += ["", "## AQR health signals on val batches (the report's debug table), at the start and the end", "",
              "weight mean -> rendered map mean / max -> 'loss' = map mean / weight mean - 1; feature relative "
              "change mean|out - x| / mean|x|; energy retention sum out^2 / sum x^2.", "",
              _table_row(["arm", "step", "map", "weight mean", "map mean", "loss", "map max", "rel. change",
                          "energy"]),
              _table_row(["---"] * 9)]
    for r in results:
        for e in (r.before, r.after):
            s = e["signals"]
            if not s:
                continue
            for modality, weight in (("bev", "lidar"), ("camera", "camera")):
                w, m = s[f"{weight}_weight_mean"], s[f"{modality}_map_mean"]
                loss = f"{m / w - 1:+.1%}" if w else "n/a"
                lines.append(_table_row([r.name, str(e["step"]), modality, f"{w:.3f}", f"{m:.4f}", loss,
                                         f"{s[f'{modality}_map_max']:.3f}", f"{s[f'{modality}_relative_change']:.1%}",
                                         f"{s[f'{modality}_energy_retention']:.1%}"]))
    lines += ["", "Plot: `map_vs_step.png`; rendered maps of each arm: `arms/<arm>/maps/step_*.png`.", ""]
    return "\n".join(lines)


def plot_map_vs_step(results: list[ArmResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ax.plot([e["step"] for e in r.evaluations], [e["mAP"] for e in r.evaluations], marker="o", label=r.name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("val mAP (official)")
    ax.set_title("AQR fine-tuning from a pretrained CMT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(plan: StudyPlan, pretrain_cfg: Config, results: list[ArmResult]) -> Path:
    """Write out/report.md and out/map_vs_step.png; returns the report's path."""
    plot_map_vs_step(results, plan.out / "map_vs_step.png")
    path = plan.out / "report.md"
    atomic_write_bytes(path, report_markdown(plan, pretrain_cfg, pretrained_metrics(plan), results).encode())
    return path
