"""lit-rlhf: the RLHF recipe as PyTorch Lightning modules."""

__version__ = "0.1.0.dev0"
