"""Triton kernels, one file per family. Installed as ``diffaccel.kernels``.

Plain launch functions over tensors; nothing here imports the ``diffaccel`` package.
"""
