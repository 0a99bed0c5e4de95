"""Helpers shared by the benchmark scripts: the machine's description and its load."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the CPU may be shared with other jobs)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """Platform, CPU, core count and JAX's backend and devices (``backend`` and ``jax_backend``
    are the same: the scripts' earlier JSON used either name)."""
    import jax

    dev = jax.devices()[0]
    return {"platform": platform.platform(), "processor": cpu_model(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "device": str(dev.device_kind), "n_devices": jax.device_count(),
            "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(), "jax": jax.__version__}
