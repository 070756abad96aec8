"""Inference backends by name, one file each; see ``base.Backend`` for the interface."""

from fusionprof.backends.base import (
    BACKENDS,
    EAGER,
    Artifacts,
    Backend,
    backend_for_format,
    backend_names,
    create_backend,
    export_formats,
    format_of,
)

__all__ = ["BACKENDS", "EAGER", "Artifacts", "Backend", "backend_for_format", "backend_names", "create_backend",
           "export_formats", "format_of"]
