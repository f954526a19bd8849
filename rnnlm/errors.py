"""The error a user can cause and fix: a bad config file, key, value, path or text.

Every command prints it as one line on stderr and exits with code 2 (rnnlm.cli.run_main).
It lives apart from the config so that the data layer, which raises it for files it cannot
read, depends on nothing above it.
"""


class ConfigError(ValueError):
    """A user-facing configuration problem (bad file, key, type or value)."""
