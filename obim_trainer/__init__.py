"""obim-trainer: Optimal Brain Iterative Merging for continued pre-training (arXiv 2502.12217)."""

__version__ = "0.1.0"
