"""The device side: runs a bundle with onnxruntime, numpy and tokenizers only."""

from edgekit.device.bundle import BundleError, Manifest, read_manifest
from edgekit.device.generate import Completion, ContextLengthError, Model, Stream

__all__ = ["BundleError", "Completion", "ContextLengthError", "Manifest", "Model", "Stream", "read_manifest"]
