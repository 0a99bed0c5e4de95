"""File input/output: RELION STAR particle tables and MRC maps/stacks, numpy in and out.

This package is the only place that imports mrcfile and starfile, and it
imports no jaxcryo maths. Every problem with an input raises `InputError`.
"""

from jaxcryo.io.errors import InputError, check_output_path, make_output_folder
from jaxcryo.io.mrc import MrcStack, open_stack, read_map, write_map, write_stack
from jaxcryo.io.star import ParticleTable, make_table, read_particles, write_particles
from jaxcryo.io.stream import ParticleStack, estimate_memory_bytes

__all__ = [
    "InputError",
    "MrcStack",
    "ParticleStack",
    "ParticleTable",
    "check_output_path",
    "estimate_memory_bytes",
    "make_output_folder",
    "make_table",
    "open_stack",
    "read_map",
    "read_particles",
    "write_map",
    "write_particles",
    "write_stack",
]
