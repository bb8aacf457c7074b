"""The kernels as torch.library custom ops: schema/fake/autograd registration and torch.compile without graph breaks.

CPU tensors take the PyTorch path inside the custom ops; that is what compiles here.
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.kernels import SplatParams, modulate, splat


class SplatModulate(torch.nn.Module):
    """The AQR pattern in miniature: render query weights onto the BEV map, then modulate the features."""

    def forward(self, x: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = splat(weights, coords, valid, x.shape[2], x.shape[3], sigma=1.0, position="exact",
                     kernel_norm="normalized")
        out, stats = modulate(x, maps[:, 0], alpha=0.3, beta=0.7, return_stats=True)
        return out, stats.abs_change / stats.abs_input


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 9, generator=gen)
    weights = torch.rand(2, 6, generator=gen)
    coords = torch.rand(2, 6, 1, 2, generator=gen) * torch.tensor([8.0, 9.0])
    valid = torch.ones(2, 6, 1, dtype=torch.bool)
    return x, weights, coords, valid


def test_opcheck_custom_ops():
    """Schema, fake (meta) kernels and registered autograd are consistent with the real kernels."""
    x, weights, coords, valid = inputs()
    params = SplatParams.build(8, 9, method="gaussian", kernel_norm="sum", position="exact", sigma=1.0,
                               kernel_size=None, threshold=0.01, clamp_max=1.5, fill=1.0, eps=1e-6)
    torch.library.opcheck(torch.ops.aqrcmt.splat.default, (weights, coords, valid, *params.op_args()))
    scale = torch.rand(2, 8, 9)
    torch.library.opcheck(torch.ops.aqrcmt.modulate.default, (x, scale, True))


def test_no_graph_break_and_compiled_matches_eager():
    module = SplatModulate()
    x, weights, coords, valid = inputs()
    explanation = torch._dynamo.explain(module)(x, weights, coords, valid)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")   # traces the fake kernels and autograd
    grads = []
    for fn in (module, compiled):
        w = weights.clone().requires_grad_()
        c = coords.clone().requires_grad_()
        out, change = fn(x, w, c, valid)
        (out.square().sum() + change).backward()
        grads.append((out.detach(), change.detach(), w.grad, c.grad))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


@pytest.mark.slow
def test_inductor_compiles_both_ops():
    module = SplatModulate()
    x, weights, coords, valid = inputs(1)
    compiled = torch.compile(module, fullgraph=True)
    w = weights.clone().requires_grad_()
    out, change = compiled(x, w, coords, valid)
    out.sum().backward()
    eager_out, eager_change = module(x, weights, coords, valid)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(change, eager_change, rtol=1e-5, atol=1e-5)
    assert w.grad is not None and w.grad.abs().sum() > 0
