"""Compressing trained networks: statistics cache, the layer-by-layer pipeline, reports."""
