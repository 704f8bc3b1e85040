"""Grouped-matmul kernels behind `dispatch_impl='ragged'` (see `grouped_matmul`).

Each kernel runs natively when the step is lowered for its platform and in Pallas
interpret mode everywhere else, chosen by `jax.lax.platform_dependent` at lowering time:
a CPU test runs the kernel's own code, and a step exported from a CPU host for the
kernel's platform holds the real kernel call.
"""
