"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HetCompError(Exception):
    """A user-facing error: bad input, unknown name, invalid config, diverged training."""
