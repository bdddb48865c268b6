"""User-facing errors.

Anything the user can fix (a wrong flag, a missing file, a corrupt checkpoint) is raised as
`UserError`; the CLI prints its message on one line and exits with code 2. Everything else is a
bug and keeps its traceback.
"""

import sys


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds (never `assert` on user input)."""
    if not condition:
        raise UserError(message)


def exit_code(prog: str, main, *args) -> int:
    """Run `main(*args)` for a script: a `UserError` prints `prog: error: message` on stderr and gives its
    exit code (2), without a traceback; success gives 0."""
    try:
        main(*args)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
