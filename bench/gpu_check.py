"""GPU readiness check: one prepared run that answers "does it work, and how fast" on a device in a few minutes.

    python bench/gpu_check.py --out bench/results            # `make gpu-check`; part budgets sum to < 9 min on a GPU
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke --out DIR   # same code paths, tiny shapes, CPU

Parts (each time-boxed; an exception in one is recorded and the others still run):
1. correctness: the Triton kernels (compiled on CUDA; the interpreter on CPU) vs their PyTorch references,
   forward and backward, fp32 / bf16 / fp16 inputs;
2. kernels: Triton vs the eager PyTorch path vs torch.compile of it; modulation bandwidth vs a device copy
   of the same bytes (buffers >= 4x the L2 cache);
3. inference of the released configs (random weights, synthetic inputs at the real sizes): per stage, eager vs
   compiled, fp16 vs bf16 autocast, peak memory, FPS at batch 1;
4. training step eager vs compiled, AQR off vs recommended AQR, and the recompile count over steps with varying
   voxel and GT counts.
5. export: the exported part of tiny_aqr (fp32 and fp16 ONNX) run by onnxruntime's CUDA provider vs eager
   PyTorch on the GPU; skipped, with the reason, without CUDA or without onnxruntime-gpu.
Writes `<out>/<device>.md` and `.json` (device: `gpu_<name>` or `cpu_<arch>`). The protocol: docs/benchmarks.md.
The code: bench/gpucheck/, one module per concept (plan, timing, part, inputs, the four parts, report, cli).
"""
import sys

from gpucheck.cli import main

if __name__ == "__main__":
    sys.exit(main())
