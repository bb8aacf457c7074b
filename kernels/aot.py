"""Ahead-of-time compilation of the kernels for GPUs that are not there, and what the compiled code needs.

`launch_variants` builds, with CPU tensors, every `Launch` the presets and the renderer/modulation options make:
each kernel, each constexpr combination, each input dtype. `compile_launch` compiles one for an architecture
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, the NVIDIA backend's own ptxas), and
`resource_usage` reads registers, shared memory, stack and local (spill) memory from the cubin with the wheel's
`cuobjdump --dump-resource-usage`. `occupancy` turns those into the theoretical occupancy of an architecture, and
`register_budget` into the registers a launch may use and still reach the occupancy it assumes (`Launch.occupancy`).

Needs the compiled Triton (not TRITON_INTERPRET=1: the interpreter replaces the kernels' JIT functions).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from .launch import Launch
from .modulate_triton import modulate_backward_launch, modulate_forward_launch
from .splat_params import SplatParams
from .splat_triton import splat_backward_launch, splat_forward_launch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TRITON_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
                 torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}


@dataclass(frozen=True)
class Arch:
    """One GPU generation: compute capability, per-SM limits (CUDA programming guide, compute capabilities table)
    and the datasheet's SM count, memory bandwidth and FP32 rate of its SXM part."""
    name: str
    capability: int
    sms: int
    bandwidth_gbs: float          # HBM bandwidth, GB/s
    fp32_tflops: float            # peak FP32 (non-tensor) TFLOP/s, an FMA counted as 2
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    register_unit: int = 256      # registers are allocated per warp in units of this many


ARCHS = {
    80: Arch("A100 SXM4 80GB (sm_80)", 80, sms=108, bandwidth_gbs=2039, fp32_tflops=19.5, shared_per_sm=164 * 1024),
    90: Arch("H100 SXM5 (sm_90)", 90, sms=132, bandwidth_gbs=3350, fp32_tflops=66.9),
    100: Arch("B200 (sm_100)", 100, sms=148, bandwidth_gbs=8000, fp32_tflops=75.0),
}


@dataclass(frozen=True)
class Resources:
    """Per-thread registers, per-block shared memory (bytes), per-thread stack and local memory (bytes; local
    memory in a kernel without arrays on the stack is register spill)."""
    registers: int
    shared: int
    stack: int
    local: int

    @property
    def spills(self) -> bool:
        """Local memory or stack in use: registers spilled."""
        return self.local > 0 or self.stack > 0


def nvidia_backend_missing() -> str:
    """'' when this Triton build can compile for NVIDIA GPUs, else why not (the tests' skip reason)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        return f"this Triton build has no NVIDIA backend ({exc})"
    if not os.path.exists(cuobjdump_path()):
        return f"this Triton build ships no cuobjdump ({cuobjdump_path()})"
    return ""


def cuobjdump_path() -> str:
    """The cuobjdump the Triton wheel ships beside its ptxas."""
    import triton.backends.nvidia as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def signature(launch: Launch) -> tuple[dict, dict]:
    """(signature, constexprs) of the launch for ASTSource: tensors as typed pointers, ints as i32 (1 as a
    constexpr, as Triton specializes it), floats as fp32, the launch's constexprs as they are."""
    names = launch.kernel.arg_names
    sig, constexprs = {}, dict(launch.constexprs)
    for name, value in zip(names, launch.args):
        if isinstance(value, torch.Tensor):
            sig[name] = _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool) or (isinstance(value, int) and value == 1):
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            sig[name] = "fp32"
    for name in launch.constexprs:
        sig[name] = "constexpr"
    return sig, constexprs


def compile_launch(launch: Launch, capability: int):
    """The launch's kernel compiled for sm_<capability> (a triton CompiledKernel: .asm["ptx"], .asm["cubin"])."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, constexprs = signature(launch)
    source = ASTSource(launch.kernel, sig, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": launch.num_warps})


def resource_usage(cubin: bytes, kernel_name: str) -> Resources:
    """Registers, shared memory, stack and local memory of `kernel_name` in `cubin` (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", file.name], check=True,
                              capture_output=True, text=True).stdout
    block = text[text.index(f"Function {kernel_name}:"):]
    values = {key: int(value) for key, value in re.findall(r"(REG|SHARED|STACK|LOCAL):(\d+)", block)[:4]}
    return Resources(values["REG"], values["SHARED"], values["STACK"], values["LOCAL"])


def blocks_per_sm(res: Resources, num_warps: int, arch: Arch) -> int:
    """Resident blocks per SM, limited by registers (allocated per warp), shared memory, warps and blocks."""
    regs_per_warp = -(-res.registers * 32 // arch.register_unit) * arch.register_unit
    by_regs = arch.registers_per_sm // (regs_per_warp * num_warps) if res.registers else arch.max_blocks_per_sm
    by_shared = arch.shared_per_sm // res.shared if res.shared else arch.max_blocks_per_sm
    return min(by_regs, by_shared, arch.max_warps_per_sm // num_warps, arch.max_blocks_per_sm)


def occupancy(res: Resources, num_warps: int, arch: Arch) -> float:
    """Theoretical occupancy: resident warps / the SM's warp slots."""
    return blocks_per_sm(res, num_warps, arch) * num_warps / arch.max_warps_per_sm


def register_budget(num_warps: int, target: float, arch: Arch) -> int:
    """The most registers per thread at which blocks of `num_warps` warps still reach `target` occupancy."""
    blocks = -(-round(target * arch.max_warps_per_sm) // num_warps)
    regs_per_warp = arch.registers_per_sm // (blocks * num_warps) // arch.register_unit * arch.register_unit
    return min(255, regs_per_warp // 32)


# ------------------------------------------------------------------------------------------------------------------
# What the presets and options launch
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSizes:
    """Kernel problem sizes: B samples, Q queries, the BEV map (V = 1) and V camera maps, C feature channels."""
    batch: int
    queries: int
    bev_hw: tuple[int, int]
    views: int
    camera_hw: tuple[int, int]
    channels: int

    def describe(self) -> str:
        return (f"B={self.batch}, Q={self.queries}, BEV {self.bev_hw[0]}x{self.bev_hw[1]}, "
                f"{self.views}x{self.camera_hw[0]}x{self.camera_hw[1]} camera maps, C={self.channels}")

    def map_shape(self, kind: str) -> tuple[int, int, int]:
        """(V, H, W) of the BEV ('bev') or the camera ('camera') maps."""
        return (1, *self.bev_hw) if kind == "bev" else (self.views, *self.camera_hw)


# The released vov head: 900 queries + 300 denoising queries, 180x180 BEV, 6 x 40x100 camera maps, 256 channels.
RELEASED = KernelSizes(batch=2, queries=900 + 300, bev_hw=(180, 180), views=6, camera_hw=(40, 100), channels=256)
# The same maps with few queries and channels: the same constexprs (tile spans depend on the map size), quick.
RELEASED_MAPS_FEW_QUERIES = KernelSizes(batch=1, queries=16, bev_hw=(180, 180), views=6, camera_hw=(40, 100),
                                        channels=16)

SPLAT_DEFAULTS = dict(method="gaussian", kernel_norm="sum", position="floor", kernel_size=None, fill=1.0, eps=1e-6)
# Options no preset uses, one per constexpr value the presets leave out (the renderer's other modes).
OPTION_RENDERS = {
    "exact sum": dict(sigma=1.0, kernel_norm="sum", position="exact", threshold=0.01, clamp_max=1.5),
    "exact normalized": dict(sigma=2.0, kernel_norm="normalized", position="exact", threshold=0.0, clamp_max=None),
    "peak": dict(sigma=1.0, kernel_norm="peak", threshold=0.01, clamp_max=1.5),
    "bilinear": dict(method="bilinear", sigma=1.0, threshold=0.01, clamp_max=1.5),
    "direct": dict(method="direct", sigma=1.0, threshold=0.01, clamp_max=None),
}


def preset_renders(kind: str) -> dict[str, dict]:
    """Preset name -> the splat options of its renderer on the 'bev' or 'camera' maps, for every AQR preset; of
    presets with the same options the first name is kept."""
    from aqrcmt.presets import get_preset, list_presets
    renders = {}
    for name in list_presets():
        aqr = get_preset(name).model.aqr
        if not aqr.enabled:
            continue
        r = aqr.render
        options = dict(method=r.method, kernel_norm=r.kernel_norm, position=r.position,
                       sigma=r.sigma_bev if kind == "bev" else r.sigma_camera, threshold=r.threshold,
                       clamp_max=r.clamp_max, fill=r.fill)
        if options not in renders.values():
            renders[name] = options
    return renders


@dataclass(frozen=True)
class Variant:
    """One launch to compile: a name (kernel, options, map kind, dtype) and how to build it."""
    name: str
    kernel: str
    dtype: str
    build: Callable[[], Launch]


# (sizes, "bev" or "camera", dtype) -> (weights [B, Q], coords [B, Q, V, 2], valid [B, Q, V], H, W) on the CPU
SplatInputs = Callable[[KernelSizes, str, torch.dtype], tuple]


def uniform_inputs(sizes: KernelSizes, kind: str, dtype: torch.dtype) -> tuple:
    """Weights U(0, 1), coordinates uniform over the maps, each (query, view) valid with probability 0.8."""
    views, height, width = sizes.map_shape(kind)
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(sizes.batch, sizes.queries, generator=gen)
    coords = torch.rand(sizes.batch, sizes.queries, views, 2, generator=gen) * torch.tensor([height, width])
    valid = torch.rand(sizes.batch, sizes.queries, views, generator=gen) < 0.8
    return weights.to(dtype), coords.to(dtype), valid, height, width


def _splat_variants(render: str, options: dict, kind: str, dtype: str, sizes: KernelSizes,
                    splat_inputs: SplatInputs) -> list[Variant]:
    def inputs():
        weights, coords, valid, height, width = splat_inputs(sizes, kind, DTYPES[dtype])
        p = SplatParams.build(height, width, **{**SPLAT_DEFAULTS, **options})
        return weights, coords, valid, p

    def forward() -> Launch:
        weights, coords, valid, p = inputs()
        return splat_forward_launch(weights, coords, valid, p)[0]

    def backward() -> Launch:
        weights, coords, valid, p = inputs()
        _, (out, raw, den) = splat_forward_launch(weights, coords, valid, p)
        return splat_backward_launch(torch.ones_like(out), weights, coords, valid, raw, den, p)[0]

    return [Variant(f"splat forward, {render}, {kind}, {dtype}", "splat forward", dtype, forward),
            Variant(f"splat backward, {render}, {kind}, {dtype}", "splat backward", dtype, backward)]


def _modulate_variants(kind: str, dtype: str, sizes: KernelSizes) -> list[Variant]:
    def inputs():
        views, h, w = sizes.map_shape(kind)
        n = sizes.batch * views
        return torch.empty(n, sizes.channels, h, w, dtype=DTYPES[dtype]), torch.empty(n, h, w)

    def forward(stats: bool) -> Launch:
        return modulate_forward_launch(*inputs(), stats)[0]

    def backward() -> Launch:
        x, scale = inputs()
        return modulate_backward_launch(torch.empty_like(x), x, scale)[0]

    return [Variant(f"modulate forward, stats, {kind}, {dtype}", "modulate forward", dtype, lambda: forward(True)),
            Variant(f"modulate forward, {kind}, {dtype}", "modulate forward", dtype, lambda: forward(False)),
            Variant(f"modulate backward, {kind}, {dtype}", "modulate backward", dtype, backward)]


def launch_variants(sizes: KernelSizes, options: bool, dtypes: tuple[str, ...] = tuple(DTYPES),
                    splat_inputs: SplatInputs = uniform_inputs) -> list[Variant]:
    """Every launch of the presets' renderers (BEV and camera) and of modulation, per dtype; with `options`, also
    the renderer modes no preset uses (OPTION_RENDERS). The splat launches bin `splat_inputs`' queries."""
    variants = []
    for dtype in dtypes:
        for kind in ("bev", "camera"):
            renders = {**preset_renders(kind), **(OPTION_RENDERS if options else {})}
            for render, opts in renders.items():
                variants += _splat_variants(render, opts, kind, dtype, sizes, splat_inputs)
            variants += _modulate_variants(kind, dtype, sizes)
    return variants


def build_key(launch: Launch) -> tuple:
    """What decides the compiled code: the kernel, the signature, the constexprs and the warps."""
    sig, constexprs = signature(launch)
    return launch.kernel.__name__, tuple(sig.items()), tuple(sorted(constexprs.items())), launch.num_warps


# ------------------------------------------------------------------------------------------------------------------
# Roofline: what a launch moves and computes, and the time that bounds it
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """One launch's work: (pixel, query) pairs it evaluates (splat; 0 for modulation), bytes it reads and writes
    in global memory (each once), and arithmetic instructions it issues (estimated: OPS_PER_PAIR)."""
    pairs: int
    bytes: int
    ops: int


# Instructions per evaluated (pixel, query) pair, counted from the inner loops (offsets, footprint test, kernel
# value, accumulation; an exp counted as 4: the special-function units issue a quarter of the FP32 rate), by
# kernel and METHOD (0 gaussian, 1 bilinear, 2 direct); the coordinate gradients add COORD_GRAD_OPS.
OPS_PER_PAIR = {("_splat_fwd_kernel", 0): 20, ("_splat_fwd_kernel", 1): 14, ("_splat_fwd_kernel", 2): 6,
                ("_splat_bwd_kernel", 0): 22, ("_splat_bwd_kernel", 1): 18, ("_splat_bwd_kernel", 2): 8}
COORD_GRAD_OPS = 10
MODULATE_OPS = {"_modulate_fwd_kernel": 1, "_modulate_bwd_kernel": 2}     # per feature element
STATS_OPS = 8


def launch_work(launch: Launch) -> Work:
    """The Work of a splat or modulation launch, from its arguments (list offsets, tensor sizes, constexprs)."""
    name = launch.kernel.__name__
    args = dict(zip(launch.kernel.arg_names, launch.args))
    flags = launch.constexprs
    if name.startswith("_modulate"):
        x = args["x_ptr"]
        feature_passes = 2 if name == "_modulate_fwd_kernel" else 3          # x, out / grad_out, x, grad_x
        scale_passes = 1 if name == "_modulate_fwd_kernel" else 2            # s / s, grad_s
        ops = x.numel() * (MODULATE_OPS[name] + (STATS_OPS if flags.get("STATS") else 0))
        return Work(0, feature_passes * x.numel() * x.element_size() + scale_passes * args["scale_ptr"].numel() * 4,
                    ops)
    offsets = args["offset_ptr"].long()
    counts = offsets[1:] - offsets[:-1]
    block_q, tile_pixels = flags["BLOCK_Q"], flags["TILE_H"] * flags["TILE_W"]
    pairs = int((-(-counts // block_q)).sum()) * block_q * tile_pixels
    listed = int(offsets[-1])
    weights, coords = args["weight_ptr"], args["coord_ptr"]
    per_entry = 4 + weights.element_size() + 2 * coords.element_size()     # entry, weight, (y, x)
    pixel_maps = 3 if flags["NORMALIZED"] else 2                              # out, raw (, den) / grad, raw (, den)
    if name == "_splat_fwd_kernel":
        pixels = args["out_ptr"].numel()
        ops = pairs * OPS_PER_PAIR[name, flags["METHOD"]]
    else:
        pixels = args["grad_out_ptr"].numel()
        per_entry += 4 + (8 if flags["COORD_GRAD"] else 0)                    # the shares written
        ops = pairs * (OPS_PER_PAIR[name, flags["METHOD"]] + (COORD_GRAD_OPS if flags["COORD_GRAD"] else 0))
    return Work(pairs, offsets.numel() * 4 + listed * per_entry + pixels * pixel_maps * 4, ops)


def roofline_seconds(work: Work, arch: Arch) -> tuple[float, str]:
    """(seconds, 'memory' or 'compute'): the larger of bytes / bandwidth and instructions / FP32 issue rate
    (peak FLOP/s / 2: an FMA is one instruction). Launch latency (a few microseconds) not included."""
    memory = work.bytes / (arch.bandwidth_gbs * 1e9)
    compute = work.ops / (arch.fp32_tflops * 1e12 / 2)
    return (memory, "memory") if memory >= compute else (compute, "compute")
