"""The one exception type users see.

A `TinkerError` carries a single line that says what went wrong, where (file, field, name) and how to fix it.
The CLI prints it to stderr and exits with status 2; anything else is a bug and keeps its traceback.
"""


class TinkerError(ValueError):
    """A user-facing error: bad input, a missing file, an unknown name. Message is one line."""
