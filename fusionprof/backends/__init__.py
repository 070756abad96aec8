"""Inference backends by name, one file each; see ``base.Backend`` for the interface."""

from fusionprof.backends.base import BACKENDS, Artifacts, Backend, backend_names, create_backend

__all__ = ["BACKENDS", "Artifacts", "Backend", "backend_names", "create_backend"]
