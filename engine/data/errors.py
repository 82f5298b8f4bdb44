"""The one exception the data layer raises for problems a user can fix."""

from engine.errors import UserError


class DataError(UserError, RuntimeError):
    """Dataset missing, corrupt or malformed; the one-line message says what to put where.

    A UserError, so the CLI prints it as one line (exit code 2) instead of a traceback.
    """
