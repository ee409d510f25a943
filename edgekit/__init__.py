"""edgekit: small open language models, exported on a host, run offline on a device.

`edgekit.host` (torch, transformers) builds bundles; `edgekit.device` (onnxruntime,
numpy, tokenizers) runs them. The device side never imports the host side.
"""

__version__ = "0.1.0"
