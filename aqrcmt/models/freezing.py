"""Freezing parts of a model: the one prefix rule, switched-off gradients and BatchNorm kept in eval mode.

Parts are named by dotted prefixes at module boundaries: ``"img_backbone"`` covers ``img_backbone`` itself and
``img_backbone.stem.conv.weight``, but not ``img_backbone2.x``; ``""`` covers the whole module. A frozen part's
parameters stop requiring gradients and its BatchNorm layers stay in eval mode through every ``train()``, so
their running statistics never change. mmdet's ``norm_eval=True`` of the released image backbones is the
BatchNorm half alone over the whole backbone (``batchnorm_eval_prefixes = ("",)``): statistics frozen, affine
weights still trained.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn


def is_under(name: str, prefix: str) -> bool:
    """True when the dotted `name` is `prefix` or lies below it (``""`` is the root: every name)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def longest_prefix(name: str, prefixes: Iterable[str]) -> Optional[str]:
    """The longest of `prefixes` that `name` lies under (:func:`is_under`), or None."""
    return max((p for p in prefixes if is_under(name, p)), key=len, default=None)


def prefixes_outside(module: nn.Module, keep: str) -> list[str]:
    """Module prefixes that cover every part of `module` except the submodule `keep` (dotted path): the siblings
    of each module on the path to `keep`. Freezing them trains `keep` alone."""
    prefixes, path = [], ""
    for part in keep.split("."):
        parent = module.get_submodule(path) if path else module
        prefixes += [f"{path}.{name}" if path else name for name, _ in parent.named_children() if name != part]
        prefixes += [f"{path}.{name}" if path else name for name, _ in parent.named_parameters(recurse=False)]
        path = f"{path}.{part}" if path else part
    return prefixes


class FreezableModule(nn.Module):
    """A module whose parts can be frozen by prefix; BatchNorm layers below `batchnorm_eval_prefixes` stay in eval
    mode through every ``train()``."""

    batchnorm_eval_prefixes: tuple[str, ...] = ()

    def keep_batchnorm_eval(self, prefixes: Iterable[str]) -> None:
        """Keep the BatchNorm layers below `prefixes` in eval mode (their affine weights still train)."""
        self.batchnorm_eval_prefixes = tuple(sorted(set(self.batchnorm_eval_prefixes) | set(prefixes)))
        self.train(self.training)

    def freeze(self, prefixes: Iterable[str]) -> None:
        """Freeze the parts below `prefixes`: parameters stop requiring gradients, BatchNorm stays in eval mode."""
        prefixes = tuple(prefixes)
        for name, parameter in self.named_parameters():
            if any(is_under(name, p) for p in prefixes):
                parameter.requires_grad_(False)
        self.keep_batchnorm_eval(prefixes)

    def train(self, mode: bool = True) -> "FreezableModule":
        super().train(mode)
        if mode and self.batchnorm_eval_prefixes:
            for name, module in self.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                        any(is_under(name, p) for p in self.batchnorm_eval_prefixes):
                    module.eval()
        return self
