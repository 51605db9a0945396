"""Routing kernels: coordinate descent for the soft top-k in PyTorch, and (imported only when used,
on CUDA) its fused Triton version in coor_descent_triton."""

from .coor_descent import TopkReturn, coor_descent, topk

__all__ = ['TopkReturn', 'coor_descent', 'topk']
