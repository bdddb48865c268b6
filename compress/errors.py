"""User-facing errors.

Anything the user can fix (a wrong flag, a missing file, a corrupt checkpoint) is raised as
`UserError`; the CLI prints its message on one line and exits with code 2. Everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds (never `assert` on user input)."""
    if not condition:
        raise UserError(message)
