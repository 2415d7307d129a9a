"""Stage 2 — activations: calibration text, capturing activations, MI / similarity estimators and
the analysis that turns them into per-layer numbers."""
