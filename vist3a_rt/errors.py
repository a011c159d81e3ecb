"""Exception types raised at the runtime's boundaries.

Every error a user can cause (bad input, bad file) derives from ``Vist3AInputError``
so the CLI can map it to exit code 2; anything else is an internal failure (exit 1).
"""


class Vist3AInputError(ValueError):
    """Invalid user input: shapes, values, prompts, paths, settings."""


class CheckpointError(Vist3AInputError):
    """A checkpoint or weights file is missing, truncated, foreign or mismatched."""


class ConfigError(Vist3AInputError):
    """A configuration file or dict does not follow the expected schema."""
