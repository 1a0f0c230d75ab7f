"""What programs lowered for TPU compute differently from the portable operations (chosen by
`lax.platform_dependent` at lowering, as `allflax.cpu` is for CPU)."""
