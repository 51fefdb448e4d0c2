"""The serving runtime: KServe v2 / Triton protocol over HTTP and gRPC with a dynamic batcher."""

__version__ = "0.1.0"
