"""tensorgate: one Open Inference Protocol gRPC gateway for TorchScript, SavedModel and ONNX."""

__version__ = "0.1.0"
