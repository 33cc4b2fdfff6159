"""gradyard: job definitions for documented PyTorch models, trained as DDP on Ray Train."""

__version__ = "0.1.0"
