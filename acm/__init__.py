"""ACM Merge Explorer: Activation-Guided Consensus Merging (arXiv 2505.14009) as a library.

Pure library (torch / numpy / transformers); no UI imports. See README.md for the formulas
this project uses and docs/design.md for the design.
"""

__version__ = "0.1.0"

from pathlib import Path as _Path

# The repository's bundled assets (demo models, calibration and evaluation sets): one definition, so a
# module's depth in the package never decides where they are found.
ASSETS_DIR = _Path(__file__).resolve().parent.parent / "assets"
