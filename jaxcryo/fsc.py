"""Fourier shell correlation and resolution."""
from __future__ import annotations

import numpy as np


def fsc(map_a, map_b):
    """FSC between two real (N, N, N) maps, per shell index 0 .. N//2 (round(|k|)).

    Returns a float64 array of length N//2 + 1 (shell 0 is the DC term).
    """
    a = np.fft.rfftn(np.asarray(map_a, np.float64))
    b = np.fft.rfftn(np.asarray(map_b, np.float64))
    return _shell_correlation(a, b, np.asarray(map_a).shape[-1])


def fsc_ft(pairs_a, pairs_b):
    """FSC between two maps given as jaxcryo Fourier pairs (N, N, N//2+1, 2)."""
    pa, pb = np.asarray(pairs_a, np.float64), np.asarray(pairs_b, np.float64)
    return _shell_correlation(pa[..., 0] + 1j * pa[..., 1], pb[..., 0] + 1j * pb[..., 1], pa.shape[0])


def _shell_correlation(a, b, n):
    k = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shells = np.rint(r).astype(int).ravel()
    # Half-volume voxels off the kx = 0 (and Nyquist) plane stand for two voxels of the full map.
    mult = np.full(a.shape, 2.0)
    mult[..., 0] = 1.0
    if n % 2 == 0:
        mult[..., -1] = 1.0
    mult = mult.ravel()
    n_shells = n // 2 + 1
    keep = shells < n_shells
    s = shells[keep]
    a, b, mult = a.ravel()[keep], b.ravel()[keep], mult[keep]
    cross = np.bincount(s, mult * (a * np.conj(b)).real, n_shells)
    pa = np.bincount(s, mult * np.abs(a) ** 2, n_shells)
    pb = np.bincount(s, mult * np.abs(b) ** 2, n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = cross / np.sqrt(pa * pb)
    return np.nan_to_num(out, nan=0.0)


def shell_frequencies(box: int, pixel_size_angstrom: float):
    """Spatial frequency (1/Angstrom) of each FSC shell index 0 .. N//2."""
    return np.arange(box // 2 + 1) / (box * pixel_size_angstrom)


def resolution(curve, pixel_size_angstrom: float, threshold: float = 0.143):
    """Resolution in Angstrom where the FSC first falls below ``threshold``.

    Interpolates linearly between the last shell above and the first below; if the curve
    never falls below, the Nyquist resolution 2 * pixel size is returned.
    """
    curve = np.asarray(curve, np.float64)
    box = 2 * (len(curve) - 1)
    freqs = shell_frequencies(box, pixel_size_angstrom)
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return 2.0 * pixel_size_angstrom
    i = below[0] + 1  # first shell below the threshold
    f0, f1, c0, c1 = freqs[i - 1], freqs[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1) if c0 != c1 else f1
    return float(1.0 / f) if f > 0 else float("inf")
