"""The one exception type for bad user input (printed by the CLI as a single clear message)."""


class UserError(ValueError):
    """Bad input or an impossible request; the message names the input, what was expected and what to do."""

    exit_code = 2  # the CLI's exit status for it (a refused checkpoint file: 1, `runtime.safe_load`)
