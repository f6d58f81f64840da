"""Errors in what the user gave (flags, files, a policy for another env): `mu` prints one line
and exits 2. Any other exception is a bug and keeps its traceback."""


class UsageError(ValueError):
    """Bad input from the user, said in one line that names what to change."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or run directory the user named is not there (or lacks what it should hold)."""
