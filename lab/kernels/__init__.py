"""The kernel matrix: every supported kernel booted with virtme-ng, the kernel_matrix
tests run inside (``python -m lab.kernels``, ``make test-kernels``)."""
