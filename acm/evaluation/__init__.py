"""Stage 5 — evaluation: generation engines, answer checking, presets and the evaluate loop."""
