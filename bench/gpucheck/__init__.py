"""The device check behind bench/gpu_check.py, one module per concept.

plan (sizes; what runs on a GPU, a CPU and in the smoke run), timing (one call timed on a device), part (a
time-boxed part and its record), inputs (synthetic kernel operands and scene batches, shared with
bench/bench_kernels.py), correctness / kernel_speed / inference / training / export (the five parts), report
(environment and markdown), cli (the command line).
"""
