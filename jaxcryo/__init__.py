"""jaxcryo: cryo-EM reconstruction with known poses by preconditioned stochastic gradients.

The public API, by layer (imports flow one way):
geometry -> forward -> loss -> curvature -> optim -> reconstruct; io and cli sit outside.
"""
from jaxcryo.config import Config
from jaxcryo.curvature import (condition_by_radius, exact_diagonal, hutchinson_diagonal, hvp,
                               power_iteration, radial_profile, rademacher, shell_spread)
from jaxcryo.forward import (CTFParams, FourierGrid, Particles, backproject, ft_to_images, ft_to_volume,
                             images_to_ft, make_ctf_params, prepare_particles, project, render, volume_to_ft)
from jaxcryo.fsc import fsc, fsc_ft, resolution
from jaxcryo.geometry import euler_to_matrix, matrix_to_euler, random_rotations
from jaxcryo.loss import Problem, loss, value_grad_hvp
from jaxcryo.noise import estimate_noise, shell_weights_from_sigma2
from jaxcryo.optim import armijo, precon_sgd, scale_by_diagonal, scale_by_hutchinson
from jaxcryo.refine import Refinement, RefineState, refine
from jaxcryo.abinitio import AbInitio, AbInitioState, abinitio, flip_hand
from jaxcryo.reconstruct import METHODS, ReconState, Reconstruction, make_optimizer, reconstruct
from jaxcryo.simulate import simulate_particles, synthetic_molecule
from jaxcryo.symmetry import symmetry_matrices

__version__ = "0.1.0"
__all__ = [
    "Refinement", "RefineState", "refine",
    "AbInitio", "AbInitioState", "abinitio", "flip_hand",
    "condition_by_radius", "exact_diagonal", "hutchinson_diagonal", "hvp", "power_iteration",
    "radial_profile", "rademacher", "shell_spread", "CTFParams", "FourierGrid", "Particles",
    "backproject", "ft_to_images", "ft_to_volume", "images_to_ft", "make_ctf_params",
    "prepare_particles", "project", "render", "volume_to_ft", "fsc", "fsc_ft", "resolution",
    "euler_to_matrix", "matrix_to_euler", "random_rotations", "Problem", "loss", "value_grad_hvp",
    "armijo", "precon_sgd", "scale_by_diagonal", "scale_by_hutchinson", "METHODS", "ReconState",
    "Reconstruction", "make_optimizer", "reconstruct", "simulate_particles", "synthetic_molecule",
    "symmetry_matrices",
]
__all__ += ["estimate_noise", "shell_weights_from_sigma2", "Config"]
