"""An official CMT checkpoint (.pth) -> aqrcmt safetensors, and back (``aqrcmt convert``, ``reverse=True``).

Every key of the source is checked against the official layout of the config's released model (the
manifests in ``manifests/``): names go through :mod:`aqrcmt.checkpoint.keymap`, sparse-conv weights saved in
the spconv-1.x layout [kD, kH, kW, in, out] are permuted to spconv-2's [out, kD, kH, kW, in], and the file is
written only when no key is unexpected, missing or of the wrong shape (``--allow-missing`` /
``--allow-unexpected`` take glob patterns for the first two). Reading is tensors-only
(``torch.load(weights_only=True)``) unless ``--unsafe-load`` is given.

    aqrcmt convert voxel0075_vov_1600x640_epoch20.pth cmt_vov.safetensors --config cmt_voxel0075_vov_1600x640_cbgs
    aqrcmt convert cmt_vov.safetensors back.pth --config cmt_voxel0075_vov_1600x640_cbgs --reverse
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from aqrcmt.checkpoint import keymap
from aqrcmt.checkpoint.io import CheckpointError, is_safetensors, load_safetensors, save_safetensors_atomic, \
    sha256_of, torch_save_atomic
from aqrcmt.checkpoint.manifest import Manifest, ManifestEntry, load_manifest, manifests_for, \
    released_manifest_names
from aqrcmt.checkpoint.weights import REQUIRED_SETTINGS_KEY, apply_settings, matches_any, strip_wrapper_prefixes
from aqrcmt.presets import load_config

CONVERTER_VERSION = "1"
NUM_BATCHES_TRACKED = "num_batches_tracked"
# Float dtypes that widen to float32 without loss.
_LOSSLESS_TO_FLOAT32 = (torch.float16, torch.bfloat16)


class ConversionError(CheckpointError):
    """The source does not match the expected layout; the message lists every offending key."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass
class SourceCheckpoint:
    """A checkpoint's tensors (wrapper prefixes removed) and what else it carried."""
    tensors: dict[str, torch.Tensor]
    module_versions: dict[str, int] | None   # from state_dict._metadata (module prefix -> version); None if absent
    meta: dict[str, Any]                      # mmcv 'meta' of a .pth, or the safetensors metadata


def read_checkpoint(path: Path, unsafe_load: bool = False) -> SourceCheckpoint:
    """Read a safetensors file, a plain state dict, or an mmcv ``{'meta', 'state_dict', ...}`` .pth."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors" or is_safetensors(path):
        tensors, metadata = load_safetensors(path)
        return SourceCheckpoint(strip_wrapper_prefixes(tensors), None, dict(metadata))
    obj = _torch_load(path, unsafe_load)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        top = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state dict or a dict with a 'state_dict' entry, found {top}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {not_tensors}")
    metadata = getattr(state, "_metadata", None)
    versions = _module_versions(metadata) if isinstance(metadata, dict) else None
    return SourceCheckpoint(strip_wrapper_prefixes(dict(state)), versions, dict(meta) if isinstance(meta, dict) else {})


def _module_versions(metadata: dict[str, Any]) -> dict[str, int]:
    """Module prefix (wrappers removed) -> version, from a state dict's ``_metadata``."""
    versions = {}
    for prefix, entry in metadata.items():
        if isinstance(entry, dict) and entry.get("version") is not None:
            versions[keymap.strip_wrappers(prefix + ".")[:-1]] = entry["version"]
    return versions


def _verify_zip_crc(path: Path) -> None:
    """Check every record of a zip-format torch file against its CRC-32 (torch.load does not)."""
    if not zipfile.is_zipfile(path):
        return  # legacy format or a damaged zip directory: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: record {bad!r} fails its CRC-32 check")


def _torch_load(path: Path, unsafe_load: bool) -> Any:
    _verify_zip_crc(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if blocked and not unsafe_load:
            raise CheckpointError(
                f"{path}: the checkpoint stores a Python object of type {blocked.group(1)} (old mmcv checkpoints "
                "keep such objects in their 'meta'), which the tensors-only loader refuses. If you trust the "
                "file's origin, rerun with --unsafe-load (it executes the file's pickled code).") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_load_error_reason(e)})") from None
    except (ImportError, AttributeError) as e:  # --unsafe-load of a pickle that references absent code
        raise CheckpointError(f"{path}: unpickling needs code that is not installed ({e})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_load_error_reason(e)})") from None


def _load_error_reason(error: BaseException) -> str:
    """The informative part of a torch.load error (its unpickler reason, else its first line)."""
    text = str(error)
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, re.S)
    if reason:
        return " ".join(reason.group(1).split())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------------------------------
# Matching a source against the manifests
# --------------------------------------------------------------------------------------------------
@dataclass
class Conversion:
    """The converted tensors (output names, official state_dict order) and what happened to each key."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    parameter_keys: set[str] = field(default_factory=set)      # output keys that are parameters (not buffers)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    permuted: list[str] = field(default_factory=list)          # sparse weights taken from the spconv-1 layout
    widened: list[str] = field(default_factory=list)           # fp16/bf16 -> fp32
    filled: list[str] = field(default_factory=list)            # num_batches_tracked set to 0
    dropped: dict[str, str] = field(default_factory=dict)      # source key -> reason
    absent_groups: list[str] = field(default_factory=list)     # optional groups with no key in the source
    allowed_missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.wrong_shape or self.wrong_dtype)


def spconv1_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """spconv-1.x weight shape [kD, kH, kW, in, out] of a spconv-2 shape [out, kD, kH, kW, in]."""
    return tuple(shape[1:]) + (shape[0],)


def _sparse_weight(tensor: torch.Tensor, entry: ManifestEntry, version: int | None) -> tuple[torch.Tensor, bool] | None:
    """The spconv-2 weight for `entry` and whether it was permuted, or None when neither layout fits.

    The shape decides; only when both layouts have the same shape does the module's ``_metadata``
    version (2 = spconv-2, as mmdet3d writes it) break the tie, defaulting to spconv-2.
    """
    native, legacy = entry.shape, spconv1_shape(entry.shape)
    shape = tuple(tensor.shape)
    if shape == native and (shape != legacy or version in (None, 2)):
        return tensor, False
    if shape == legacy:
        return tensor.permute(4, 0, 1, 2, 3).contiguous(), True
    return None


def match(source: SourceCheckpoint, manifests: Sequence[Manifest], *, reverse: bool,
          allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()) -> Conversion:
    """Map `source` onto `manifests`: official -> aqrcmt names, or aqrcmt -> official with `reverse`."""
    source_name: Callable[[str], str] = keymap.to_aqrcmt if reverse else (lambda k: k)
    output_name: Callable[[str], str] = (lambda k: k) if reverse else keymap.to_aqrcmt
    result = Conversion()
    used: set[str] = set()
    entries = [(m, e) for m in manifests for e in m.entries]
    fill_bn = not any(k.endswith("." + NUM_BATCHES_TRACKED) for k in source.tensors)

    for manifest in manifests:
        if manifest.optional_group and not any(source_name(e.key) in source.tensors for e in manifest.entries):
            result.absent_groups.append(manifest.name)
    for manifest, entry in entries:
        if manifest.name in result.absent_groups:
            continue
        src, out = source_name(entry.key), output_name(entry.key)
        if src not in source.tensors:
            if fill_bn and entry.key.endswith("." + NUM_BATCHES_TRACKED):
                result.tensors[out] = torch.zeros(entry.shape, dtype=entry.dtype)
                result.filled.append(out)
            elif matches_any(entry.key, allow_missing) or matches_any(out, allow_missing):
                result.allowed_missing.append(out)
            else:
                result.missing.append(src)
            continue
        used.add(src)
        tensor = source.tensors[src]
        if entry.kind == "sparse_conv" and not reverse:
            version = (source.module_versions or {}).get(entry.key.rsplit(".", 1)[0])
            fitted = _sparse_weight(tensor, entry, version)
        else:
            fitted = (tensor, False) if tuple(tensor.shape) == entry.shape else None
        if fitted is None:
            result.wrong_shape.append(f"{src}: {list(tensor.shape)}, expected {list(entry.shape)}")
            continue
        tensor, permuted = fitted
        if tensor.dtype != entry.dtype:
            if entry.dtype == torch.float32 and tensor.dtype in _LOSSLESS_TO_FLOAT32:
                tensor = tensor.float()
                result.widened.append(out)
            else:
                result.wrong_dtype.append(f"{src}: {tensor.dtype}, expected {entry.dtype}")
                continue
        if permuted:
            result.permuted.append(out)
        if src != out:
            result.renamed.append((src, out))
        result.tensors[out] = tensor
        if entry.is_parameter:
            result.parameter_keys.add(out)

    for key in source.tensors:
        if key in used:
            continue
        reason = None if reverse else keymap.drop_reason(key)
        if reason is None and matches_any(key, allow_unexpected):
            reason = "allowed by --allow-unexpected"
        if reason is None:
            result.unexpected.append(key)
        else:
            result.dropped[key] = reason
    return result


def closest_release(source: SourceCheckpoint, reverse: bool) -> tuple[str, float]:
    """The released manifest whose (name, shape) set overlaps the source's most, and that overlap (Jaccard)."""
    to_official = keymap.to_official if reverse else (lambda k: k)
    have = {(to_official(k), tuple(t.shape)) for k, t in source.tensors.items()}

    def score(name: str) -> float:
        want = {(e.key, e.shape) for e in load_manifest(name).entries}
        want |= {(e.key, spconv1_shape(e.shape)) for e in load_manifest(name).entries if e.kind == "sparse_conv"}
        common = len(have & want)
        return common / max(len(have) + len(load_manifest(name)) - common, 1)

    return max(((name, score(name)) for name in released_manifest_names()), key=lambda item: item[1])


def describe_problems(result: Conversion, source: SourceCheckpoint, manifests: Sequence[Manifest],
                      reverse: bool) -> str:
    """A message listing every unexpected / missing / wrong-shape / wrong-dtype key, with a hint."""
    lines = [f"refusing to write: the checkpoint does not match {' + '.join(m.name for m in manifests)}"]
    best, overlap = closest_release(source, reverse)
    if best != manifests[0].name and overlap > 0.5:
        lines.append(f"hint: it looks like a checkpoint of {best} ({overlap:.0%} of keys/shapes agree); "
                     f"try --config {best}")
    for title, keys, flag in (("unexpected", result.unexpected, " (drop with --allow-unexpected PATTERN)"),
                              ("missing", result.missing, " (accept with --allow-missing PATTERN)"),
                              ("wrong shape", result.wrong_shape, ""), ("wrong dtype", result.wrong_dtype, "")):
        if keys:
            lines.append(f"{len(keys)} {title} key(s){flag}:")
            lines.extend(f"  {k}" for k in keys)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def summary(result: Conversion) -> str:
    """Keys, parameters and bytes per top-level module, then what was renamed/permuted/dropped."""
    per_module: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, tensor in result.tensors.items():
        row = per_module[key.split(".", 1)[0]]
        row[0] += 1
        row[1] += tensor.numel() if key in result.parameter_keys else 0
        row[2] += tensor.numel() * tensor.element_size()
    lines = [f"{'module':<24}{'keys':>7}{'parameters':>14}{'bytes':>14}"]
    for module, (keys, params, size) in per_module.items():
        lines.append(f"{module:<24}{keys:>7}{params:>14,}{size:>14,}")
    totals = [sum(row[i] for row in per_module.values()) for i in range(3)]
    lines.append(f"{'total':<24}{totals[0]:>7}{totals[1]:>14,}{totals[2]:>14,}")
    notes = [(len(result.renamed), "renamed (keymap.RENAMES)"),
             (len(result.permuted), "sparse-conv weights permuted from the spconv-1 layout [kD,kH,kW,in,out]"),
             (len(result.widened), "tensors widened to float32"),
             (len(result.filled), f"{NUM_BATCHES_TRACKED} buffers absent in the source, set to 0"),
             (len(result.allowed_missing), "missing keys allowed by --allow-missing (not written)")]
    lines += [f"{count} {text}" for count, text in notes if count]
    lines += [f"{name}: not in the source (the model initialises these)" for name in result.absent_groups]
    lines += [f"dropped {key}: {reason}" for key, reason in result.dropped.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def official_state_dict(tensors: dict[str, torch.Tensor], manifests: Sequence[Manifest]) -> OrderedDict:
    """An official-order state dict carrying the ``_metadata`` versions mmdet3d needs.

    mmdet3d permutes a sparse-conv weight whenever its module's version is not 2, so the versions are
    required for the spconv-2 weights to load unchanged in the original code.
    """
    state = OrderedDict(tensors)
    state._metadata = OrderedDict(  # type: ignore[attr-defined]
        (prefix, {"version": version}) for m in manifests for prefix, version in m.module_versions.items())
    return state


def _json_safe(value: Any) -> Any:
    """`value` with numpy/torch scalars and arrays as plain numbers/lists and anything else as its repr."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v)))


# The AQR fork's weight generator: tanh on its Linear(256, 2) (HEAD b0a62a5), and its bev/rv type embeddings
# declared but never added to the keys. A converted fork checkpoint records both; --load-from applies them.
FORK_GENERATOR_SETTINGS = {"model.aqr.generator.activation": "tanh", "model.aqr.generator.use_type_embed": False}


def fork_generator_settings(manifests: Sequence[Manifest], result: Conversion) -> dict[str, Any]:
    """The config settings a conversion needs: the fork generator's when its tensors were converted, else none."""
    converted = {m.name for m in manifests} - set(result.absent_groups)
    return dict(FORK_GENERATOR_SETTINGS) if "aqr_fork_weight_generator" in converted else {}


def convert(src: Path, dst: Path, config_name: str, *, overrides: Sequence[str] = (), reverse: bool = False,
            unsafe_load: bool = False, allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = (),
            overwrite: bool = False) -> Conversion:
    """Convert `src` to `dst` for the model of `config_name` (preset name or .json path) with `overrides`
    (``key.path=value``) applied; the safetensors output stores that config.

    Raises CheckpointError (nothing written) when the source is unreadable or does not match, ConfigError
    for an unknown config.
    """
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"source and destination are the same file: {src}")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"destination {dst} exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise CheckpointError(f"destination folder {dst.parent} does not exist")
    cfg = load_config(config_name, list(overrides))
    try:
        manifests = manifests_for(cfg.model)
    except ValueError as e:
        raise CheckpointError(f"--config {config_name}: {e}") from None
    source = read_checkpoint(src, unsafe_load)
    result = match(source, manifests, reverse=reverse, allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    if not result.ok:
        raise ConversionError(describe_problems(result, source, manifests, reverse))
    required = fork_generator_settings(manifests, result)
    provenance = {"converter": "aqrcmt.checkpoint.convert", "converter_version": CONVERTER_VERSION,
                  "source_file": src.name, "source_sha256": sha256_of(src), "config_name": cfg.name,
                  "manifest": "+".join(m.name for m in manifests if m.name not in result.absent_groups)}
    if reverse:
        original_meta = json.loads(source.meta.get("source_meta", "{}"))
        meta = {**original_meta, "aqrcmt_convert": provenance}
        torch_save_atomic({"meta": meta, "state_dict": official_state_dict(result.tensors, manifests)}, dst)
    else:
        # "config" holds the resolved config as JSON, as in training checkpoints (`aqrcmt evaluate` reads it).
        apply_settings(cfg, required)
        metadata = {**provenance, "format": "aqrcmt", "config": cfg.to_json(),
                    "source_meta": json.dumps(_json_safe(source.meta)), REQUIRED_SETTINGS_KEY: json.dumps(required)}
        save_safetensors_atomic(result.tensors, dst, metadata)
    return result
