"""Ahead-of-time checks: a recipe compiled for a TPU or GPU on any host (`python -m allflax.aot.check`),
with the TPU chips and the GPU compile targets it compiles for."""
