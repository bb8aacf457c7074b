"""Memory accounting of a training step by module: the tensors autograd saves for the backward, and the model state.

`SavedTensorLedger` wraps a forward pass: every tensor an op saves for the backward (``saved_tensors_hooks``) is
charged once per storage to the innermost running module's group (:data:`MODULE_GROUPS`, by state-dict prefix);
what the loss code saves after the detector's forward returned is charged to "losses". Storages that existed
before the forward (parameters, buffers, the batch) are not charged. Two modes:

- ``keep=True``: the saved tensors stay in the graph (a backward can follow); :meth:`SavedTensorLedger.bytes_by_group`
  counts those still held by the graph, i.e. the activation memory alive when the backward starts.
- ``keep=False``: each saved tensor is dropped at once (no backward possible), so a forward too large to hold
  its activations can still be counted; a storage is charged once while it is alive.

Not seen by the hooks: what an autograd Function keeps as plain ``ctx`` attributes (spconv's index pairs) and the
inputs a ``torch.utils.checkpoint`` segment keeps for its recomputation (those appear in a measured peak only).
"""
from __future__ import annotations

import resource
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

# (state-dict prefix, group), first match wins; the detector's own code (between its submodules) -> "detector".
MODULE_GROUPS: tuple[tuple[str, str], ...] = (
    ("pts_voxel_layer", "voxelization"), ("pts_voxel_encoder", "voxelization"),
    ("pts_middle_encoder", "sparse encoder"), ("pts_backbone", "SECOND"), ("pts_neck", "SECOND-FPN"),
    ("grid_mask", "image backbone"), ("img_backbone", "image backbone"), ("img_neck", "image neck"),
    ("pts_bbox_head.aqr", "AQR"), ("pts_bbox_head.transformer", "head: decoder"),
    ("pts_bbox_head", "head: embeddings, task heads"),
)
LOSSES = "losses"
DETECTOR = "detector"


def module_group(name: str) -> str:
    """The group of a module or parameter by its state-dict name ('' = the detector itself)."""
    for prefix, group in MODULE_GROUPS:
        if name == prefix or name.startswith(prefix + "."):
            return group
    return DETECTOR


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def storage_key(tensor: Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage under `tensor`."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Held:
    """What the graph holds in place of a saved tensor (``keep=True``): its liveness is observable by weakref."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensorLedger:
    """Context manager over the forward of `root`: saved-for-backward bytes by module group (module docstring).

    existing: tensors whose storages are not charged (the parameters and buffers of `root` always are not).
    """

    def __init__(self, root: nn.Module, existing: Iterable[Tensor] = (), keep: bool = True) -> None:
        self.root, self.keep = root, keep
        self.names = {module: name for name, module in root.named_modules()}
        self.excluded = {storage_key(t)[0] for t in (*root.parameters(), *root.buffers(), *existing)}
        self.stack: list[str] = []
        self.records: list[tuple[int, int, str, weakref.ref]] = []    # (address, bytes, group, holder)
        self.alive: dict[int, weakref.ref] = {}                       # keep=False: address -> its storage
        self.handles: list = []
        self.hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None

    def _pre(self, module: nn.Module, args) -> None:
        self.stack.append(self.names[module])

    def _post(self, module: nn.Module, args, output) -> None:
        self.stack.pop()

    def group(self) -> str:
        """The group being run: the innermost module's, or "losses" outside the root's forward."""
        if not self.stack or self.stack[0] != "":
            return LOSSES
        return module_group(self.stack[-1])

    def _pack(self, tensor: Tensor):
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if address == 0 or address in self.excluded:
            return tensor
        if self.keep:
            held = _Held(tensor)
            self.records.append((address, nbytes, self.group(), weakref.ref(held)))
            return held
        previous = self.alive.get(address)
        if previous is None or previous() is None:            # a new storage (or a freed address reused)
            self.alive[address] = weakref.ref(storage)         # alive while any tensor views it
            self.records.append((address, nbytes, self.group(), self.alive[address]))
        return None

    @staticmethod
    def _unpack(held):
        if not isinstance(held, (_Held, Tensor)):
            raise RuntimeError("SavedTensorLedger(keep=False) dropped the saved tensors: no backward is possible")
        return held.tensor if isinstance(held, _Held) else held

    def __enter__(self) -> "SavedTensorLedger":
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post, always_call=True))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def bytes_by_group(self) -> dict[str, int]:
        """Bytes charged per group: ``keep=True`` only the storages the graph still holds, each once."""
        seen: set[int] = set()
        totals: dict[str, int] = defaultdict(int)
        for address, nbytes, group, holder in self.records:
            if self.keep and (holder() is None or address in seen):
                continue
            seen.add(address)
            totals[group] += nbytes
        return dict(totals)


def state_bytes_by_group(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per group: parameter bytes and the bytes of the trainable ones (= their gradients; AdamW keeps 2x that)."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "trainable": 0})
    for name, param in model.named_parameters():
        entry = totals[module_group(name.rsplit(".", 1)[0])]
        nbytes = param.numel() * param.element_size()
        entry["params"] += nbytes
        entry["trainable"] += nbytes if param.requires_grad else 0
    return dict(totals)
