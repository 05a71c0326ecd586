"""ZipLM Deploy: structured pruning with runtime-measured speedup guarantees, exported to ONNX."""

__version__ = "0.1.0"
