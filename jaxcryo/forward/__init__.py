"""One image's forward model: slicing (nearest, trilinear, NUFFT), CTF, shifts."""
from jaxcryo.forward.ctf import CTFParams, ctf, electron_wavelength_angstrom, make_ctf_params, shift_phase
from jaxcryo.forward.model import (Particles, ft_to_images, ft_to_volume, images_to_ft, prepare_particles,
                                   render, slices, volume_to_ft)
from jaxcryo.forward.slicing import (INTERPOLATIONS, FourierGrid, backproject, gather, project, project_nufft,
                                     scatter, slice_stencil)

__all__ = ["CTFParams", "ctf", "electron_wavelength_angstrom", "make_ctf_params", "shift_phase", "Particles",
           "ft_to_images", "ft_to_volume", "images_to_ft", "prepare_particles", "render", "slices",
           "volume_to_ft", "INTERPOLATIONS", "FourierGrid", "backproject", "gather", "project",
           "project_nufft", "scatter", "slice_stencil"]
