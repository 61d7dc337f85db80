"""Backends other than the C++ operators: the Triton kernels (and their operator registration)."""
