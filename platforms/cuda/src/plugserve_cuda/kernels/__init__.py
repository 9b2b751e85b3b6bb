"""Triton kernels of the CUDA platform. Importing this package imports Triton."""
