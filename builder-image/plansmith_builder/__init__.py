"""The build Job program: ONNX to an engine for one target, gated on accuracy, published to storage."""
