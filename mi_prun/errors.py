"""The one exception type users see: a message that names the problem and the fix.

The CLI prints `MiPrunError` as a one-line message (traceback only with --debug); the app shows it
with `st.error`. Anything else escaping is a bug in mi-prun.
"""


class MiPrunError(Exception):
    """A problem the user can fix; the message says what and how."""


class NonFiniteError(MiPrunError):
    """NaN or inf in hidden states; `block` is the first block whose output is not finite."""

    def __init__(self, message: str, block: int | None = None):
        super().__init__(message)
        self.block = block


class NotEnoughText(MiPrunError):
    """A text holds fewer tokens than the samples asked of it (the message says how many)."""
