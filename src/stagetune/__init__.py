"""stagetune: staged hyperparameter search for PyTorch speech models on Kaldi data."""

__version__ = "0.1.0"
