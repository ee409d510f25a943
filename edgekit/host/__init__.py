"""The host side: load, adapt, quantize and build bundles (needs the `export` extra)."""

from edgekit.errors import ExportError
from edgekit.host.export import ExportOptions, export
from edgekit.host.families import SUPPORTED

__all__ = ["ExportError", "ExportOptions", "SUPPORTED", "export"]
