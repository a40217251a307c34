"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class LitRLHFError(Exception):
    """An error a user can meet and fix (bad data, bad config, missing file); never a bug in the package."""


class DataError(LitRLHFError):
    """A dataset row or source that cannot be read; the message names the file, the row and the field."""


class ConfigError(LitRLHFError):
    """A configuration value that cannot work."""


class TrainingDiverged(LitRLHFError):
    """A loss or reward score became NaN or infinite: the run stopped before a checkpoint or export could hold it."""
