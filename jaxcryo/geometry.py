"""Rotations (RELION's ZYZ Euler convention), Fourier grids, masks and shells.

Conventions used throughout jaxcryo:

* Volumes are indexed ``[z, y, x]`` (as mrcfile returns them); a 3-D point is ``(x, y, z)``.
* The real-space origin is the voxel ``N // 2`` on every axis (RELION's centre).
* Fourier volumes are stored half-size, in ``numpy.fft.rfftn`` layout: shape
  ``(N, N, N // 2 + 1)``, axes z and y in FFT order, axis x holding ``kx = 0 .. N/2``.
  The map is real, so ``V(-k) = conj(V(k))`` gives the other half.
* A rotation matrix ``A`` is RELION's ``Euler_angles2matrix(rot, tilt, psi)``. The 2-D image
  frequency ``(kx, ky)`` samples the 3-D transform at ``A.T @ (kx, ky, 0)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def euler_to_matrix(euler_deg):
    """RELION ZYZ Euler angles (rot, tilt, psi) in degrees -> rotation matrices.

    Args:
      euler_deg: (..., 3) angles in degrees, as rlnAngleRot, rlnAngleTilt, rlnAnglePsi.
    Returns:
      (..., 3, 3) matrices A with A = Rz(psi) Ry(tilt) Rz(rot) in RELION's sign convention.
    """
    euler = jnp.deg2rad(jnp.asarray(euler_deg))
    ca, cb, cg = jnp.cos(euler[..., 0]), jnp.cos(euler[..., 1]), jnp.cos(euler[..., 2])
    sa, sb, sg = jnp.sin(euler[..., 0]), jnp.sin(euler[..., 1]), jnp.sin(euler[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = jnp.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], axis=-1)
    row1 = jnp.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], axis=-1)
    row2 = jnp.stack([sc, ss, cb], axis=-1)
    return jnp.stack([row0, row1, row2], axis=-2)


def matrix_to_euler(matrix):
    """Rotation matrices -> RELION ZYZ Euler angles in degrees (tilt in [0, 180]).

    Inverse of :func:`euler_to_matrix`; at the gimbal lock (tilt 0 or 180) rot is set to 0.
    """
    a = jnp.asarray(matrix)
    sb = jnp.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    tilt = jnp.arctan2(sb, a[..., 2, 2])
    regular = sb > 16 * jnp.finfo(a.dtype).eps
    rot = jnp.where(regular, jnp.arctan2(a[..., 2, 1], a[..., 2, 0]), 0.0)
    psi = jnp.where(regular, jnp.arctan2(a[..., 1, 2], -a[..., 0, 2]),
                    jnp.arctan2(a[..., 0, 1], a[..., 1, 1]))
    return jnp.rad2deg(jnp.stack([rot, tilt, psi], axis=-1))


def random_rotations(key, n, dtype=jnp.float32):
    """n rotation matrices uniform on SO(3) (normalised random quaternions)."""
    q = jax.random.normal(key, (n, 4), dtype=dtype)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return jnp.stack([
        jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        jnp.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        jnp.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)


def image_freqs(box):
    """Integer frequencies of a half (rfft2) image: (N, N//2+1, 2) array of (kx, ky)."""
    ky = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1, dtype=np.float64)
    kxx, kyy = np.meshgrid(kx, ky, indexing="xy")
    return np.stack([kxx, kyy], axis=-1)


def half_image_weights(box):
    """Multiplicity of each rfft2 pixel in the full spectrum: 1 on the kx = 0 (and kx = N/2)
    columns, whose conjugate partners are stored too, 2 elsewhere. Shape (N, N//2+1)."""
    w = np.full((box, box // 2 + 1), 2.0)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    return w


def half_volume_weights(box):
    """Multiplicity of each rfftn voxel in the full spectrum: 1 on the kx = 0 (and, for even N,
    kx = N/2) planes, whose conjugate partners are stored too, 2 elsewhere. Shape (N, N, N//2+1)."""
    w = np.full((box, box, box // 2 + 1), 2.0)
    w[..., 0] = 1.0
    if box % 2 == 0:
        w[..., -1] = 1.0
    return w


def volume_freqs(box):
    """Integer frequencies of a half (rfftn) volume: (N, N, N//2+1, 3) array of (kx, ky, kz)."""
    k = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1, dtype=np.float64)
    kzz, kyy, kxx = np.meshgrid(k, k, kx, indexing="ij")
    return np.stack([kxx, kyy, kzz], axis=-1)


def volume_radius(box):
    """|k| in Fourier pixels for each voxel of the half volume, shape (N, N, N//2+1)."""
    return np.linalg.norm(volume_freqs(box), axis=-1)


def image_radius(box):
    """|k| in Fourier pixels for each pixel of the half image, shape (N, N//2+1)."""
    return np.linalg.norm(image_freqs(box), axis=-1)


def shell_index(radius):
    """Fourier shell of each voxel: round(|k|), as int32."""
    return np.rint(np.asarray(radius)).astype(np.int32)


def shell_counts(box):
    """Voxels per Fourier shell in the *full* volume (each half-volume voxel counted with its
    Hermitian mate), index = shell radius 0 .. ceil(sqrt(3) N / 2)."""
    k = np.fft.fftfreq(box, 1.0 / box)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return np.bincount(shell_index(r).ravel())


def default_alpha(box, r_max=None):
    """The paper's floor for the preconditioner: 1 / (most voxels in any shell within r_max)."""
    counts = shell_counts(box)
    r_max = box // 2 if r_max is None else int(r_max)
    return 1.0 / float(counts[: r_max + 1].max())


def spherical_mask(box, radius=None, soft_width=0.0):
    """Real-space (N, N, N) spherical mask centred at N//2; radius defaults to N/2 - 1 pixels."""
    radius = box / 2 - 1 if radius is None else radius
    c = np.arange(box) - box // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return _soft_edge(r, radius, soft_width)


def circular_mask(box, radius=None, soft_width=0.0):
    """Real-space (N, N) circular mask centred at N//2; radius defaults to N/2 - 1 pixels."""
    radius = box / 2 - 1 if radius is None else radius
    c = np.arange(box) - box // 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return _soft_edge(r, radius, soft_width)


def _soft_edge(r, radius, soft_width):
    if soft_width <= 0:
        return (r <= radius).astype(np.float32)
    edge = np.clip((r - radius) / soft_width, 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * edge)).astype(np.float32)
