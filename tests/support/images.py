"""Comparing images made by two code paths: within a stated tolerance, never bit for bit (kernels, and with them the
last bit, differ between CPUs, memory layouts and batch sizes)."""

import numpy as np

FP32_TOL = 1  # of 255: what two fp32 paths of the same computation may differ by after rounding to 8 bits


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def max_diff(a, b):
    return int(np.abs(pixels(a) - pixels(b)).max())


def assert_close_images(a, b, tol=FP32_TOL):
    assert pixels(a).shape == pixels(b).shape
    d = max_diff(a, b)
    assert d <= tol, f"images differ by {d}/255 (allowed {tol})"
