"""The host side: load, adapt, quantize and build bundles (needs the `export` extra)."""

from edgekit.host.export import ExportOptions, export
from edgekit.host.load import SUPPORTED, ExportError

__all__ = ["ExportError", "ExportOptions", "SUPPORTED", "export"]
