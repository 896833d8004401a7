"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class PeftExportError(Exception):
    """A problem the user can fix (bad file, bad option); the message names it."""
