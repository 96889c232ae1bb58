"""Triton GPU kernels. Each has a torch reference (in the method's folder: sparsity/, formats/, attention/) and a GPU test comparing them.

Importing this package needs Triton and CUDA; nothing in `workbench` imports it at module level.
"""
