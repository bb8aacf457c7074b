"""Official CMT / AQR-fork state-dict names <-> aqrcmt names.

aqrcmt's modules keep the official names (``pts_middle_encoder.conv_input.0.weight``,
``pts_bbox_head.transformer.decoder.layers.0.attentions.1.attn.in_proj_weight``, VoVNet's ``stem_1/conv``
...), so the map is the identity except for the table below. Layout changes are not names: sparse-conv
weights are handled in :mod:`aqrcmt.checkpoint.convert`.
"""
from __future__ import annotations

import fnmatch

# official prefix -> aqrcmt prefix
RENAMES: tuple[tuple[str, str], ...] = (
    ("pts_bbox_head.aqr_weight_generator.", "pts_bbox_head.aqr.weight_generator."),
)

# AQR-fork keys aqrcmt does not keep (glob pattern on the official name, reason).
DROPPED: tuple[tuple[str, str], ...] = (
    ("pts_bbox_head.weight_renderer.gaussian_kernel",
     "derived buffer: the splat kernel is recomputed from model.aqr.render.sigma_*"),
    ("pts_bbox_head.attention_bias_generator.*",
     "the fork's attention-bias path is not ported (window-offset buffers and bias_scale)"),
    ("pts_bbox_head.feature_modulator.*",
     "learnable modulation scale/bias of the fork are not ported (modulation is set by model.aqr.modulate)"),
)

# Wrappers that prefix every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def strip_wrappers(key: str) -> str:
    """Remove DDP / torch.compile wrapper components from a key."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key.replace("._orig_mod.", ".")


def to_aqrcmt(official: str) -> str:
    for old, new in RENAMES:
        if official.startswith(old):
            return new + official[len(old):]
    return official


def to_official(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def drop_reason(official: str) -> str | None:
    """Why aqrcmt does not keep this official key, or None when it keeps it."""
    for pattern, reason in DROPPED:
        if fnmatch.fnmatchcase(official, pattern):
            return reason
    return None
