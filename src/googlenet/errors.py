"""The one exception type for bad input: the CLI turns it into a one-line message and exit 2."""


class UserError(ValueError):
    """Bad input from the user (a value, a file, an option), with a message that names it."""


class Note(UserWarning):
    """Something the user should know that is not an error (a migrated key, a missing class).
    The CLI prints it as one line: `googlenet CMD: note: ...`."""


def note(message: str) -> None:
    """Tell the user `message` (a Note warning: visible, testable with pytest.warns)."""
    import warnings

    warnings.warn(message, Note, stacklevel=3)
