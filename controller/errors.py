"""Errors in what the user gave (flags, files, a policy for another env): `mu` prints one line
and exits 2. Any other exception is a bug and keeps its traceback."""


class UsageError(ValueError):
    """Bad input from the user, said in one line that names what to change."""
