"""Point-group symmetry in RELION's conventions (``relion_reconstruct --sym``, ``relion_refine --sym``).

The groups are generated from the rotation axes RELION's symmetry library lists for each
symbol (its ``SymList`` fills a symmetry "file" of ``rot_axis FOLD X Y Z`` lines and closes the
group under products). Axes are in the map's (x, y, z) frame, x the fastest MRC axis:

* ``Cn``: an n-fold axis along z.
* ``Dn``: the n-fold along z and a 2-fold along x.
* ``T``:  a 3-fold along z and a 2-fold along (0, sqrt 2, 1)/sqrt 3 = (0, 0.816496, 0.577350).
* ``O``:  a 3-fold along (1, 1, 1)/sqrt(3) and a 4-fold along z (the 4-folds are the x, y, z axes).
* ``I`` = ``I2`` (RELION's default): 2-folds along z (and x, y), a 5-fold along
  (1, 0, phi)/|.| and a 3-fold along (0, 1/phi, phi)/|.| (phi the golden ratio).
  ``I1``: 2-fold along x, 5-fold along (phi, 0, -1)/|.|, 3-fold along (phi, 1/phi, 0)/|.|.
  ``I3``: 2-fold along (-1, 0, phi)/|.|, 5-fold along z, 3-fold (-0.491123, 0.356822, 0.794654).
  ``I4``: 2-fold along (1, 0, phi)/|.|, 5-fold along (0.894427, 0, 0.447214) (= (2, 0, 1)/sqrt(5)),
  3-fold (0.491123, 0.356822, 0.794654).

Symbols are case-insensitive, as in RELION. Groups with mirrors or inversion (Cs, Ci, Cnv,
Cnh, Dnh, Dnv, Th, Td, Oh, Ih) describe non-chiral objects and are refused: a cryo-EM map of
a protein is chiral.

A map V is symmetric under the group when V(g x) = V(x) for every element g. The group is
closed under inversion, so "g" and "g transposed" give the same set of matrices.
"""
from __future__ import annotations

import functools
import re

import numpy as np

__all__ = ["symmetry_matrices", "symmetry_order", "canonical_symbol", "VALID_FORMS"]

VALID_FORMS = "C1, Cn, Dn (n >= 1), T, O, I (= I2), I1, I2, I3, I4 (case-insensitive)"

_PHI = (1.0 + np.sqrt(5.0)) / 2.0

# (fold, axis) generators of each non-cyclic group, as RELION's symmetry library lists them.
_GENERATORS = {
    "T": ((3, (0.0, 0.0, 1.0)), (2, (0.0, np.sqrt(2.0), 1.0))),  # (0, 0.816496, 0.577350)
    "O": ((3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))),
    "I1": ((2, (1.0, 0.0, 0.0)), (5, (_PHI, 0.0, -1.0)), (3, (_PHI, 1.0 / _PHI, 0.0))),
    "I2": ((2, (0.0, 0.0, 1.0)), (5, (1.0, 0.0, _PHI)), (3, (0.0, 1.0 / _PHI, _PHI))),
    "I3": ((2, (-1.0, 0.0, _PHI)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))),
    "I4": ((2, (1.0, 0.0, _PHI)), (5, (2.0, 0.0, 1.0)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))),
}


def canonical_symbol(symbol: str) -> str:
    """The normalised symbol: upper case, 'I' -> 'I2' ('c4' -> 'C4', 'i' -> 'I2').

    Raises:
      ValueError: for anything but C1, Cn, Dn, T, O, I, I1..I4 (the message lists the valid forms).
    """
    if not isinstance(symbol, str):
        raise ValueError(f"symmetry must be a string such as 'C4', got {symbol!r}; valid forms: {VALID_FORMS}")
    s = symbol.strip().upper()
    if s == "I":
        return "I2"
    if s in _GENERATORS:
        return s
    m = re.fullmatch(r"([CD])([1-9][0-9]*)", s)
    if m is None:
        raise ValueError(f"unknown symmetry {symbol!r}; valid forms: {VALID_FORMS}")
    return s


def _axis_rotation(fold: int, axis) -> np.ndarray:
    """The rotation by 360/fold degrees about ``axis`` (Rodrigues' formula)."""
    u = np.asarray(axis, np.float64)
    u = u / np.linalg.norm(u)
    t = 2.0 * np.pi / fold
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * (k @ k)


def _close(generators, max_order: int = 60, tol: float = 1e-4) -> np.ndarray:
    """All products of the generators (breadth first from the identity), duplicates merged."""
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for gen in generators:
                b = gen @ a
                if all(np.abs(b - e).max() > tol for e in elements):
                    elements.append(b)
                    new.append(b)
        if len(elements) > max_order:
            raise RuntimeError("symmetry generators do not close into a finite group")  # a bug, not input
        frontier = new
    return np.stack(elements)


def _orthonormalise(mats: np.ndarray) -> np.ndarray:
    """Nearest rotation to each matrix (removes the rounding of RELION's decimal axes)."""
    u, _, vt = np.linalg.svd(mats)
    return u @ vt


@functools.lru_cache(maxsize=None)
def _matrices(symbol: str) -> np.ndarray:
    kind, rest = symbol[0], symbol[1:]
    if symbol in _GENERATORS:
        gens = [_axis_rotation(f, a) for f, a in _GENERATORS[symbol]]
        if symbol.startswith("I"):
            # The 2-fold and 5-fold (exact here) generate the group; RELION's 3-fold, given to 16
            # decimals for I3/I4, is an element of it to 2e-8 and would only add rounding.
            third, gens = gens[2], gens[:2]
    else:
        n = int(rest)
        gens = [_axis_rotation(n, (0.0, 0.0, 1.0))]
        if kind == "D":
            gens.append(_axis_rotation(2, (1.0, 0.0, 0.0)))
    mats = _orthonormalise(_close(gens))
    if symbol.startswith("I") and np.abs(mats - third).max(axis=(1, 2)).min() > 1e-6:
        raise RuntimeError(f"{symbol}: the 3-fold axis is not in the group")  # a bug, not input
    # exact 0, +-1/2, +-1 where the rounding is below 1e-12 (C4, D2, O: signed permutations)
    snapped = np.rint(2.0 * mats) / 2.0
    mats = np.where(np.abs(mats - snapped) < 1e-12, snapped, mats)
    mats.setflags(write=False)
    return mats


def symmetry_matrices(symbol: str) -> np.ndarray:
    """The rotation matrices of a point group, RELION's axes and orientation.

    Args:
      symbol: 'C1', 'Cn', 'Dn', 'T', 'O', 'I' (= 'I2', RELION's default), 'I1'..'I4';
        case-insensitive.
    Returns:
      (G, 3, 3) float64 rotation matrices acting on (x, y, z), the identity first; G = 1, n, 2n,
      12, 24, 60. A fresh (writable) copy.
    Raises:
      ValueError: unknown symbol (the message lists the valid forms).

    Example:
      >>> symmetry_matrices("d2").shape
      (4, 3, 3)
    """
    return np.array(_matrices(canonical_symbol(symbol)))


def symmetry_order(symbol: str) -> int:
    """Number of elements G of the group ``symbol``."""
    return int(_matrices(canonical_symbol(symbol)).shape[0])
