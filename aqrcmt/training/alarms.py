"""Training-health checks (the fork training report's checklist) as alarms and notices, and their delivery.

Checks, each at a level of :class:`~aqrcmt.config.AQRMonitorConfig` (the AQR signals, docs/aqr.md, "Alarms") or
:class:`~aqrcmt.config.HealthConfig` (``train.health``: the loss and the evaluations):

- AQR signals (:mod:`aqrcmt.models.aqr.monitor`) of a monitored step: every rendered map's mean and max (BEV,
  all cameras, each camera view), the features' relative change, vanishing (RMS) and energy retention, the
  query-weight means; the report's healthy bands of map mean and relative change as notices (a signal past
  its alarm level raises the alarm only);
- the total loss: above a level, or not lower than ``loss_window_steps`` earlier (:class:`LossTrend`);
- the evaluations: mAP below a level from an epoch on, NDS not rising from one evaluation to the next.

The loss and evaluation checks do not need AQR. An :class:`Alarm` names signal, value, level and step;
:class:`AlarmDelivery` prints it (on the process that owns the delivery: the main one; a notice only the first
time its signal leaves its band in an epoch), appends it to ``alarms.jsonl`` in the run directory and passes counts
and text to the tracker callbacks.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from aqrcmt.config import AQRMonitorConfig, HealthConfig

Level = Literal["alarm", "notice"]


@dataclass(frozen=True)
class Alarm:
    """One signal outside its level at one step. `bound` is e.g. "< 0.2" or "outside [0.35, 0.45]"."""
    signal: str
    value: float
    bound: str
    level: Level
    step: int
    meaning: str

    def line(self) -> str:
        """The one printed line: "<level> at step N: <signal> = <value> <bound> (<meaning>)"."""
        return f"{self.level} at step {self.step}: {self.signal} = {self.value:.4g} {self.bound} ({self.meaning})"


def _below(signal: str, value: float, level: Optional[float], step: int, meaning: str) -> list[Alarm]:
    return [Alarm(signal, value, f"< {level:g}", "alarm", step, meaning)] if level is not None and value < level else []


def _above(signal: str, value: float, level: Optional[float], step: int, meaning: str) -> list[Alarm]:
    return [Alarm(signal, value, f"> {level:g}", "alarm", step, meaning)] if level is not None and value > level else []


def _outside(signal: str, value: float, band: Optional[tuple[float, float]], step: int, meaning: str) -> list[Alarm]:
    if band is None or band[0] <= value <= band[1]:
        return []
    return [Alarm(signal, value, f"outside [{band[0]:g}, {band[1]:g}]", "notice", step, meaning)]


def check_aqr_signals(stats: dict[str, float], cfg: AQRMonitorConfig, step: int) -> list[Alarm]:
    """Alarms and notices of one monitored step's AQR signals (names of aqrcmt.models.aqr.monitor)."""
    alarms: list[Alarm] = []
    for name, value in stats.items():
        if name.endswith("_map_mean"):
            alarms += (_below(name, value, cfg.map_mean_min, step,
                              "weight map too weak: features mostly scaled by the residual")
                       or _outside(name, value, cfg.map_mean_band, step, "map mean left the report's healthy band"))
        elif name.endswith("_map_max"):
            alarms += _above(name, value, cfg.map_max_max, step, "weight map too peaked: overlapping splats pile up")
        elif name.endswith("_relative_change"):
            alarms += (_above(name, value, cfg.relative_change_max, step, "modulation changes features too much")
                       or _outside(name, value, cfg.relative_change_band, step,
                                   "relative change left the report's healthy band"))
        elif name.endswith("_modulated_rms"):
            alarms += _below(name, value, cfg.modulated_rms_min, step, "modulated features vanish")
        elif name.endswith("_energy_retention"):
            alarms += _below(name, value, cfg.energy_retention_min, step, "modulation removes the features' energy")
        elif name in ("lidar_weight_mean", "camera_weight_mean"):
            alarms += _below(name, value, cfg.query_weight_min, step, "query weights collapse")
    return alarms


class LossTrend:
    """The logged total losses (steps ascending) and their checks: above ``loss_max``; not lower than the loss
    ``loss_window_steps`` earlier (compared as means of the first and the last quarter of the window, so single
    noisy batches do not decide). Its history restarts with the process (a resumed run waits a new window)."""

    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.history: list[tuple[int, float]] = []

    def check(self, step: int, loss: float) -> list[Alarm]:
        cfg = self.cfg
        alarms = _above("loss/total", loss, cfg.loss_max, step, "loss too high")
        window = cfg.loss_window_steps
        if not window:
            return alarms
        self.history.append((step, loss))
        self.history = [(s, v) for s, v in self.history if s >= step - window]
        if self.history[0][0] > step - window:
            return alarms     # the window is not filled yet
        quarter = window / 4
        early = [v for s, v in self.history if s <= self.history[0][0] + quarter]
        late = [v for s, v in self.history if s >= step - quarter]
        early_mean, late_mean = sum(early) / len(early), sum(late) / len(late)
        if late_mean >= early_mean:
            alarms.append(Alarm("loss/total", late_mean, f">= {early_mean:.4g} of {window} steps earlier", "alarm",
                                step, "loss not decreasing"))
            self.history = [(step, loss)]   # the next verdict needs a new full window
        return alarms


def check_evaluations(history: Sequence[dict], cfg: HealthConfig) -> list[Alarm]:
    """Alarms of the latest evaluation in `history` (dicts with step, epoch, mAP, NDS; oldest first): mAP below
    ``val_map_min`` from epoch ``val_map_min_from_epoch`` on; NDS not above the previous evaluation's."""
    if not history:
        return []
    last = history[-1]
    alarms = []
    if last["epoch"] >= cfg.val_map_min_from_epoch:
        alarms += _below("val/mAP", last["mAP"], cfg.val_map_min, last["step"],
                         f"mAP too low at epoch {last['epoch']}")
    if cfg.val_nds_must_rise and len(history) > 1 and last["NDS"] <= history[-2]["NDS"]:
        previous = history[-2]
        alarms.append(Alarm("val/NDS", last["NDS"], f"<= {previous['NDS']:.4g} at step {previous['step']}", "alarm",
                            last["step"], "NDS not rising between two evaluations"))
    return alarms


class AlarmDelivery:
    """Delivers alarms: one printed line each (a notice once per signal and epoch: a band the config's settings
    sit outside would otherwise print at every monitored step), a line of JSON each in `jsonl_path` (every one),
    counts and text to the tracker callbacks. Built active on the main process only (``active=False`` elsewhere:
    nothing delivered).

    log_scalars(values, step) and log_text(tag, text, step) are the tracker's (None: not logged).
    """

    def __init__(self, jsonl_path: Path, *, active: bool, print_line: Callable[[str], None] = print,
                 log_scalars: Optional[Callable[[dict[str, float], int], None]] = None,
                 log_text: Optional[Callable[[str, str, int], None]] = None):
        self.jsonl_path = jsonl_path
        self.active = active
        self.print_line = print_line
        self.log_scalars = log_scalars
        self.log_text = log_text
        self.counts: Counter[str] = Counter()
        self.printed_notices: set[tuple[str, Optional[int]]] = set()    # (signal, epoch)

    def deliver(self, alarms: Sequence[Alarm], epoch: Optional[int] = None) -> None:
        """Deliver the alarms of one step of `epoch` (None: no epoch, every notice printed)."""
        if not self.active or not alarms:
            return
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            for alarm in alarms:
                if alarm.level == "alarm" or epoch is None:
                    self.print_line(alarm.line())
                elif (alarm.signal, epoch) not in self.printed_notices:
                    self.printed_notices.add((alarm.signal, epoch))
                    self.print_line(f"{alarm.line()}; not printed again in epoch {epoch} (all in alarms.jsonl)")
                f.write(json.dumps(asdict(alarm)) + "\n")
        self.counts.update(alarm.level for alarm in alarms)
        step = alarms[-1].step
        if self.log_scalars is not None:
            self.log_scalars({f"health/{level}s": float(self.counts[level]) for level in ("alarm", "notice")}, step)
        if self.log_text is not None:
            self.log_text("health/alarms", "\n\n".join(alarm.line() for alarm in alarms), step)


def read_alarms(path: Path) -> list[Alarm]:
    """The alarms of an ``alarms.jsonl`` file (none when it does not exist)."""
    if not path.is_file():
        return []
    return [Alarm(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrainingStopped(RuntimeError):
    """A run stopped by an alarm (``on_alarm="stop"``); the message names the alarm, its step and the checkpoint
    to resume from. `main_process`: raised on the main process (the one that reports it)."""
    exit_code = 3             # train/main.py's exit status for it

    def __init__(self, message: str, main_process: bool = True):
        super().__init__(message)
        self.main_process = main_process
