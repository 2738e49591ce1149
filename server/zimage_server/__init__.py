"""zimage-serve: a gRPC inference server for Z-Image-Turbo."""

__version__ = "0.1.0"
