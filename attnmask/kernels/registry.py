"""The kernels attnmask knows: one module each, each stating its ``BACKEND``.

Adding a kernel is one module (its function, :class:`~attnmask.kernels.capabilities.Capabilities`
and :class:`~attnmask.kernels.capabilities.Measured` rows in a ``BACKEND``) plus its name
in :data:`BACKEND_MODULES`; ``apply(backend=...)``, ``auto``, the benchmarks and the tests
pick it up from :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib

from .capabilities import Backend

BACKEND_MODULES = ("sdpa", "flex", "blocked", "fused", "reference")
"""Kernel modules of :mod:`attnmask.kernels`, in the order they are listed to users."""

REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (importlib.import_module(f"{__package__}.{module}").BACKEND for module in BACKEND_MODULES)
}
"""Kernel name -> :class:`~attnmask.kernels.capabilities.Backend`."""
