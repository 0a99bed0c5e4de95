"""One frozen configuration for the driver: the settings of a run, as a value.

:func:`jaxcryo.reconstruct` and :func:`jaxcryo.refine` run the same epoch loop; ``Config`` holds
every setting they take, in two parts: the volume step (used by both) and the pose search
(used by refine; known-pose reconstruction switches the pose stage off and ignores them).
What a run is *given* (particles, reference, box, voxel size, mask, a checkpoint, callbacks,
devices) stays an argument.

    cfg = jc.Config(method="psgd", batch_size=256)
    rec = jc.reconstruct(particles, cfg, box=64, pixel_size_angstrom=2.0)
    out = jc.refine(particles, reference, cfg.replace(epochs=8), box=64, pixel_size_angstrom=2.0)

Keyword settings given beside a config override its fields (``reconstruct(p, box=..,
pixel_size_angstrom=.., epochs=3)`` is ``reconstruct(p, Config(epochs=3), ...)``); a name that
is not a field is a TypeError.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of a reconstruction or refinement (see the driver functions for their meaning).

    Volume step (reconstruct and refine):
      method: 'psgd' (Hutchinson-preconditioned SGD, the default), 'psgd-exact', 'sgd',
        'adam', 'normal' (reconstruct only), or any optax transform.
      interpolation: 'trilinear', 'nearest' or 'nufft'.
      epochs: passes over the data; None: the driver's default (reconstruct 10, refine at most 12).
      batch_size, lam, seed, symmetry: images per step, Tikhonov weight, random seed, point group.
      n_probes, beta, alpha, learning_rate, initial_step, c, warmup: the optimizer
        (:func:`jaxcryo.reconstruct.make_optimizer`).
      init_samples, average, r_max, halves, wiener_after, noise_model, noise_after, noise_tol:
        reconstruct's seeding of the curvature, iterate averaging, Fourier radius, gold-standard
        halves, Wiener prior and noise model (refine always runs gold-standard halves with a
        Wiener prior and a noise spectrum re-estimated every epoch, and ignores these).
    Pose search (refine only):
      initial_lowpass_angstrom, diameter_angstrom, local, min_epochs, global_order,
      global_epochs, max_shift_px, shift_step_px, global_shift_window_px, local_step_deg,
      min_step_deg, step_fraction, min_shift_step_px, top_k, temperature, margin_shells,
      scale_reference, chunk, final_solve: see :func:`jaxcryo.refine`.
    """

    # The volume step.
    method: Any = "psgd"
    interpolation: str = "trilinear"
    epochs: int | None = None
    batch_size: int = 128
    lam: float = 1e-4
    seed: int = 0
    symmetry: str = "C1"
    n_probes: int = 1
    beta: float = 0.9
    alpha: float | None = None
    learning_rate: float | None = None
    initial_step: float = 10.0
    c: float = 0.9
    warmup: int = 8
    init_samples: int = 16
    average: bool = True
    r_max: int | None = None
    halves: bool = True
    wiener_after: int = 0
    noise_model: str = "estimate"
    noise_after: int = 1
    noise_tol: float = 0.1
    # The pose search (refine).
    initial_lowpass_angstrom: float = 40.0
    diameter_angstrom: float | None = None
    local: bool = False
    min_epochs: int = 3
    global_order: int = 2
    global_epochs: int = 2
    max_shift_px: float | None = None
    shift_step_px: float = 1.0
    global_shift_window_px: float = 2.0
    local_step_deg: float | None = None
    min_step_deg: float = 0.5
    step_fraction: float = 0.25
    min_shift_step_px: float = 0.25
    top_k: int = 4
    temperature: float = 1.0
    margin_shells: int = 3
    scale_reference: bool = True
    chunk: int | None = None
    final_solve: bool = True

    def replace(self, **settings) -> "Config":
        """A copy with these fields changed (TypeError naming any unknown one)."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}: not fields of jaxcryo.Config")
        return dataclasses.replace(self, **settings)

    def epochs_or(self, default: int) -> int:
        return default if self.epochs is None else int(self.epochs)

    def as_dict(self) -> dict:
        """JSON-ready fields (an optax transform as method is named by its type)."""
        out = dataclasses.asdict(self)
        if not isinstance(self.method, str):
            out["method"] = type(self.method).__name__
        return out


def resolve(config: Config | None, settings: dict) -> Config:
    """``config`` (default: ``Config()``) with the keyword ``settings`` applied."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a jaxcryo.Config, got {type(config).__name__}")
    return (config or Config()).replace(**settings)
