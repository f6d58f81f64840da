"""Errors in what the user gave (flags, files, a policy for another env): `mu` prints one line
and exits 2. Any other exception is a bug and keeps its traceback."""

from pathlib import Path


class UsageError(ValueError):
    """Bad input from the user, said in one line that names what to change."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or run directory the user named is not there (or lacks what it should hold)."""


def read_text(path: str | Path, what: str) -> str:
    """The text of a file the user named (`what` says which, e.g. "preset file x.json"), or
    one line saying why it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise MissingFile(f"{what}: no such file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{what}: not text ({err})") from None
    except OSError as err:
        raise UsageError(f"{what}: cannot read it ({err.strerror or err})") from None
