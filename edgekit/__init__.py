"""edgekit: take an ONNX model from the cloud to a verified, signed bundle running on edge devices."""

__version__ = "0.5.0"
