"""The one exception type for errors a user can fix (paths, shapes, configs, weights, options).

``cm``'s entry point prints a ``UserError`` as one ``error: ...`` line and exits with status 2;
any other exception is a bug and keeps its traceback. Raise it at the point of validation with a
sentence that names the file or option and says what to do.
"""


class UserError(ValueError):
    """An input the user can fix; the message is one sentence naming the input and the remedy."""


class UntrustedConfigError(UserError):
    """A ``class_path`` read from a file (checkpoint, export) names code outside cm's allowlist."""
