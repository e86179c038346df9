"""dsbs-ray: Distilling step-by-step scaling sweeps (student size x data fraction x method) on Ray."""

__version__ = "0.1.0"
