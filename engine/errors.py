"""User-facing errors, torch-free so the CLI can catch them without importing torch.

Each carries a one-line message that names the file, key or value and what was expected;
the CLI prints it and exits with code 2.
"""


class UserError(Exception):
    """Bad input from the user: shown as one line, exit code 2, never a traceback."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used (missing, truncated, foreign, unsafe)."""


class DiskFullError(OSError):
    """Writing a file failed for lack of space or a file-size limit."""
