"""The one exception type for bad input: the CLI turns it into a one-line message and exit 2."""


class UserError(ValueError):
    """Bad input from the user (a value, a file, an option), with a message that names it."""
