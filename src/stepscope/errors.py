"""The one exception family: every user-facing failure is a StepscopeError with a one-line message."""


class StepscopeError(Exception):
    """Bad input or an impossible request; the CLI prints the message on one line and exits non-zero."""


class TraceError(StepscopeError):
    """A trace cannot be built or read (bad text, missing markers, template mismatch)."""
