"""Triton kernels of torchsample, each with a float32 plain-torch reference beside it.

Installed as ``torchsample.kernels`` (a top-level ``kernels`` would clash with a PyPI package).
Importing this package needs triton; the CPU paths of :mod:`torchsample` never import it.
"""
