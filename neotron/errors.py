"""Errors meant for the console: the CLI prints their message and exits with status 2."""


class ConfigError(Exception):
    """A mistake in a config file or override."""


class UsageError(Exception):
    """A user mistake found after the config validated (e.g. no checkpoint to evaluate)."""
