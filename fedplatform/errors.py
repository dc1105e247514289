"""User-facing errors: the CLI prints the message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the value and what is valid."""
