"""lit-rlhf: the RLHF recipe as PyTorch Lightning modules."""

__version__ = "0.1.0.dev0"

RUNS_DIR_VARIABLE = "LIT_RLHF_RUNS_DIR"
"""The environment variable that, when set, names the folder for a fit's logs instead of ``runs`` (a sweep sets it
for each trial)."""
