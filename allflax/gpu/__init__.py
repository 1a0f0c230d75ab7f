"""What compiling for NVIDIA GPUs on a host without one needs: the GPUs' published facts and the
target descriptions XLA compiles from (`targets`)."""
