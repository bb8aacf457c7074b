"""AdamW with per-module learning-rate / weight-decay multipliers, and module freezing.

Multipliers are looked up by parameter-name prefix at module boundaries (the rule of
:func:`aqrcmt.models.freezing.is_under`); the longest matching prefix wins. A learning-rate multiplier of 0
freezes the module: :func:`freeze_and_build_optimizer` hands those keys to ``model.freeze`` (no gradients,
BatchNorm kept in eval mode) and gives their parameters no optimizer state.

(The released mmcv configs match ``custom_keys`` by substring, longest key first; with the names used
in this package the prefix rule selects the same parameters for every key of the released configs.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aqrcmt.config import ConfigError, OptimConfig
from aqrcmt.checkpoint.weights import AQR_PREFIX
from aqrcmt.models.freezing import FreezableModule, is_under, longest_prefix, prefixes_outside


def _multiplier(name: str, table: dict[str, float]) -> float:
    """The multiplier of the longest key of `table` that `name` lies under (1 when none)."""
    key = longest_prefix(name, table)
    return 1.0 if key is None else table[key]


@dataclass
class ParamGroupSpec:
    lr_mult: float
    decay_mult: float
    names: list[str]


def group_parameters(model: torch.nn.Module, cfg: OptimConfig) -> dict[tuple[float, float], ParamGroupSpec]:
    """Partition the trainable parameters by (lr multiplier, decay multiplier).

    Raises ConfigError when a multiplier key matches no parameter (a typo would silently train a module
    that was meant to be frozen).
    """
    names = [n for n, _ in model.named_parameters()]
    for table_name, table in (("optim.lr_mults", cfg.lr_mults), ("optim.decay_mults", cfg.decay_mults)):
        for key in table:
            if not any(is_under(n, key) for n in names):
                raise ConfigError(f"config field '{table_name}': key {key!r} matches no parameter of the model")
    groups: dict[tuple[float, float], ParamGroupSpec] = {}
    for name, _ in model.named_parameters():
        lr_mult = _multiplier(name, cfg.lr_mults)
        decay_mult = _multiplier(name, cfg.decay_mults)
        groups.setdefault((lr_mult, decay_mult), ParamGroupSpec(lr_mult, decay_mult, [])).names.append(name)
    return groups


def frozen_module_prefixes(cfg: OptimConfig) -> list[str]:
    """The ``optim.lr_mults`` keys with multiplier 0 (everything below them is frozen).

    Raises ConfigError when a key with a non-zero multiplier lies inside a frozen one (it could not train).
    """
    frozen = sorted(k for k, v in cfg.lr_mults.items() if v == 0)
    for key, value in cfg.lr_mults.items():
        inside = [f for f in frozen if is_under(key, f)]
        if value != 0 and inside:
            raise ConfigError(f"config field 'optim.lr_mults': key {key!r} = {value:g} lies inside the frozen "
                              f"{inside[0]!r} = 0")
    return frozen


def freeze_and_build_optimizer(model: FreezableModule, cfg: OptimConfig) -> torch.optim.AdamW:
    """Freeze the lr_mult-0 modules (and, with ``cfg.train_only_aqr``, everything outside AQR) with
    ``model.freeze``, keep the BatchNorm statistics below ``cfg.batchnorm_eval`` fixed, and build AdamW over the
    rest, one param group per multiplier pair.

    Each group records its ``base_lr`` (``cfg.lr * lr_mult``) for the schedules.
    """
    frozen = frozen_module_prefixes(cfg)
    if cfg.train_only_aqr:
        frozen += prefixes_outside(model, AQR_PREFIX.rstrip("."))
    model.freeze(frozen)
    modules = [name for name, _ in model.named_modules()]
    for prefix in cfg.batchnorm_eval:
        if not any(is_under(name, prefix) for name in modules):
            raise ConfigError(f"config field 'optim.batchnorm_eval': {prefix!r} names no module of the model")
    model.keep_batchnorm_eval(cfg.batchnorm_eval)
    params = dict(model.named_parameters())
    param_groups = []
    for spec in group_parameters(model, cfg).values():
        group_params = [params[n] for n in spec.names if params[n].requires_grad]
        if group_params:
            lr = cfg.lr * spec.lr_mult
            param_groups.append({"params": group_params, "lr": lr, "base_lr": lr,
                                 "weight_decay": cfg.weight_decay * spec.decay_mult,
                                 "lr_mult": spec.lr_mult})
    if not param_groups:
        raise ConfigError("config field 'optim.lr_mults': every parameter is frozen, nothing to train")
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
