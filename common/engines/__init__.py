"""Engines shared by the inference service and the fallback chain's in-process simplified model."""
