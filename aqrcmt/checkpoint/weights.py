"""Loading aqrcmt weights into a model: the one key matcher of ``--load-from``, ``evaluate --checkpoint``,
``diagnose``, ``predict`` and :meth:`aqrcmt.inference.Predictor.from_checkpoint`.

A weights file is a ``.safetensors`` file of aqrcmt names (``aqrcmt convert`` makes one from an official
``.pth``) or a training checkpoint directory holding ``model.safetensors``. Keys are matched after removing
the DDP / torch.compile wrapper prefixes (``module.``, ``_orig_mod.``); any missing, unexpected, wrong-shape or
wrong-dtype key (a floating tensor where the model has an integer one or the reverse) raises
:class:`~aqrcmt.checkpoint.io.CheckpointError` unless a glob pattern allows it. A checkpoint directory's
``checksums.json`` is verified before its weights are read; the ``config`` metadata must be readable JSON.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from aqrcmt.checkpoint import keymap
from aqrcmt.checkpoint.io import (CHECKSUMS, CheckpointError, PathLike, is_safetensors, load_safetensors,
                                  load_safetensors_metadata, verify_checksums)

if TYPE_CHECKING:
    from aqrcmt.config import Config

# AQR tensors a plain CMT checkpoint lacks: they keep their initialisation.
AQR_PREFIX = "pts_bbox_head.aqr."
# Metadata key of the config settings a weights file needs (JSON: dotted config key -> value), e.g. a converted
# AQR-fork checkpoint's generator: {"model.aqr.generator.activation": "tanh", ...}.
REQUIRED_SETTINGS_KEY = "aqrcmt_required_settings"


@dataclass
class LoadReport:
    """How a weights file fits a model (names after wrapper stripping)."""
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)    # the file's safetensors metadata
    missing: list[str] = field(default_factory=list)          # model keys the file lacks, not allowed
    unexpected: list[str] = field(default_factory=list)       # file keys the model lacks, not allowed
    wrong_shape: list[str] = field(default_factory=list)      # "key: file (..) vs model (..)"
    wrong_dtype: list[str] = field(default_factory=list)      # "key: file torch.int32 vs model torch.float32"
    kept_init: list[str] = field(default_factory=list)        # missing but allowed: they keep their init
    ignored: list[str] = field(default_factory=list)          # unexpected but allowed: not loaded

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def problem(self) -> str:
        """The "does not fit" message naming the file and the offending keys (first 10 of each kind)."""
        return (f"{self.path}: does not fit the model: {len(self.missing)} missing {self.missing[:10]}, "
                f"{len(self.unexpected)} unexpected {self.unexpected[:10]}, {len(self.wrong_shape)} wrong shapes "
                f"{self.wrong_shape[:10]}, {len(self.wrong_dtype)} wrong dtypes {self.wrong_dtype[:10]} (an official "
                f".pth must first go through `aqrcmt convert`)")


def matches_any(key: str, patterns: Sequence[str]) -> bool:
    """True when `key` matches one of the glob `patterns` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def strip_wrapper_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with DDP / torch.compile wrapper components removed from every key.

    Raises CheckpointError when two keys become the same name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = keymap.strip_wrappers(key)
        if name in out:
            raise CheckpointError(f"key {name!r} appears twice once wrapper prefixes are removed ({key!r})")
        out[name] = value
    return out


def weights_file(path: PathLike) -> Path:
    """The safetensors file of `path` (a file, or a checkpoint directory holding model.safetensors, whose
    checksums.json, when it has one, is verified)."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKSUMS).is_file():
            verify_checksums(path)
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_safetensors(path):
        raise CheckpointError(f"{path} is not a safetensors file; convert an official .pth with `aqrcmt convert`")
    return path


def read_weights(path: PathLike) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(resolved file, tensors with wrapper prefixes stripped, metadata) of a weights file or checkpoint dir."""
    file = weights_file(path)
    tensors, metadata = load_safetensors(file)
    return file, strip_wrapper_prefixes(tensors), metadata


def match_state(model_state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], report: LoadReport, *,
                allow_missing: Sequence[str], allow_unexpected: Sequence[str],
                missing_ok_prefixes: Sequence[str]) -> None:
    """Fill `report` with how `tensors` fits `model_state` (both keyed by plain names)."""
    for key, own in model_state.items():
        if key not in tensors:
            allowed = key.startswith(tuple(missing_ok_prefixes)) or matches_any(key, allow_missing)
            (report.kept_init if allowed else report.missing).append(key)
        elif tensors[key].shape != own.shape:
            report.wrong_shape.append(f"{key}: file {tuple(tensors[key].shape)} vs model {tuple(own.shape)}")
        elif _kind(tensors[key].dtype) != _kind(own.dtype):
            report.wrong_dtype.append(f"{key}: file {tensors[key].dtype} vs model {own.dtype}")
    for key in tensors:
        if key not in model_state:
            (report.ignored if matches_any(key, allow_unexpected) else report.unexpected).append(key)


def _kind(dtype: torch.dtype) -> str:
    """"float", "complex", "bool" or "int": loading casts within a kind (fp16 -> fp32), never across."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def metadata_json(file: Path, metadata: dict[str, str], key: str, default: str) -> Any:
    """The JSON value stored under `key` in `file`'s metadata (`default` when absent); CheckpointError naming
    file and key when it is not JSON."""
    try:
        return json.loads(metadata.get(key, default))
    except ValueError as e:
        raise CheckpointError(f"{file}: metadata '{key}' is not readable JSON ({e})") from None


def load_weights(model: nn.Module, path: PathLike, *, allow_missing: Sequence[str] = (),
                 allow_unexpected: Sequence[str] = (),
                 missing_ok_prefixes: Sequence[str] = (AQR_PREFIX,)) -> LoadReport:
    """Load the weights at `path` into `model` (in place, on the model's devices); returns the report.

    allow_missing / allow_unexpected: glob patterns of keys that may be absent from the file / that the
    model lacks; missing_ok_prefixes: key prefixes that may be absent (by default the AQR tensors, so a
    plain CMT checkpoint starts an AQR model; they keep their initialisation, listed in ``kept_init``).
    Raises CheckpointError (model unchanged) on any other mismatch.
    """
    file, tensors, metadata = read_weights(path)
    report = LoadReport(file, metadata)
    own = model.state_dict()
    match_state(own, tensors, report, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                missing_ok_prefixes=missing_ok_prefixes)
    if not report.ok:
        raise CheckpointError(report.problem())
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return report


def stored_config(path: PathLike) -> "Config":
    """The config a training run or ``aqrcmt convert`` stored in the weights' metadata (tensors not read)."""
    from aqrcmt.overrides import config_from_dict

    file = weights_file(path)
    metadata = load_safetensors_metadata(file)
    if "config" not in metadata:
        raise CheckpointError(f"{file} stores no config; pass --config")
    stored = metadata_json(file, metadata, "config", "")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{file}: metadata 'config' is not a JSON object")
    return config_from_dict(stored)


def required_settings(path: PathLike) -> dict[str, Any]:
    """The config settings the weights at `path` need (dotted key -> value; empty when none are recorded)."""
    file = weights_file(path)
    settings = metadata_json(file, load_safetensors_metadata(file), REQUIRED_SETTINGS_KEY, "{}")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{file}: metadata '{REQUIRED_SETTINGS_KEY}' is not a JSON object")
    return settings


def apply_required_settings(cfg: "Config", path: PathLike) -> list[str]:
    """Set the config fields the weights at `path` need (see REQUIRED_SETTINGS_KEY); returns one note per field
    changed ("key: old -> new"). Raises ConfigError when a recorded key is not a config field."""
    return apply_settings(cfg, required_settings(path))


def apply_settings(cfg: "Config", settings: dict[str, Any]) -> list[str]:
    """Set `settings` (dotted config key -> value) on `cfg`; returns one note per field changed ("key: old -> new").
    Raises ConfigError when a key is not a config field."""
    from aqrcmt.overrides import apply_overrides

    notes = []
    for key, value in settings.items():
        section, _, leaf = key.rpartition(".")
        holder: Any = cfg
        for part in section.split(".") if section else ():
            holder = getattr(holder, part, None)
        old = getattr(holder, leaf, None)
        if old != value:
            apply_overrides(cfg, [f"{key}={value if isinstance(value, str) else json.dumps(value)}"])
            notes.append(f"{key}: {old!r} -> {value!r}")
    return notes

