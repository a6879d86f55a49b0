"""Layers the model math calls whose storage varies: `Linear` (float or quantized weights)."""
