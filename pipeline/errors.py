"""The one exception type for problems a user can fix."""


class UserError(Exception):
    """Bad input or setup: printed as one line by the entry scripts, never as a traceback."""
