"""The exported bundle: its format and schema, the writer's model card, and the predictor that
runs it with ONNX Runtime, without JAX or a checkout of allflax."""
