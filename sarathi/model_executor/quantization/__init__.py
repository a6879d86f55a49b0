"""Quantized weights: logical formats and the CPU kernels that multiply by them."""
