"""Errors the user can fix. Everything else is a bug and keeps its traceback."""


class ConvertError(Exception):
    """Bad input: one line naming the file or field, the value, and what would be accepted.

    Front ends print the message alone and exit with status 2; nothing is written.
    """

    exit_code = 2


def short(value: object) -> str:
    """A value from a user's file as an error message shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class WriteError(ConvertError):
    """The output could not be written (full disk, read-only or unwritable target): one line, exit 1.

    The temporary output was removed; the target is as it was.
    """

    exit_code = 1


class CancelledError(Exception):
    """The caller stopped a running conversion; the temporary output was removed."""
