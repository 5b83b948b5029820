"""The one exception type for bad user input (printed by the CLI as a single clear message)."""


class UserError(ValueError):
    """Bad input or an impossible request; the message names the input, what was expected and what to do."""
