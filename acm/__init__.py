"""ACM Merge Explorer: Activation-Guided Consensus Merging (arXiv 2505.14009) as a library.

Pure library (torch / numpy / transformers); no UI imports. See README.md for the formulas
this project uses and docs/design.md for the design.
"""

__version__ = "0.1.0"
