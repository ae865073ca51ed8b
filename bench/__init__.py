"""`make bench`: the DSA kernels next to their PyTorch twins and SDPA, whole training steps, sweeps and the bound.

A tool beside the training package (GPU only): `python -m bench --help`. Nothing in `train/` imports it.
"""
