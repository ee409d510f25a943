"""The host side: load, adapt, quantize and build bundles (needs the `export` extra)."""

from edgekit.errors import ExportError
from edgekit.host.export import export
from edgekit.host.families import SUPPORTED
from edgekit.host.options import ExportOptions

__all__ = ["ExportError", "ExportOptions", "SUPPORTED", "export"]
