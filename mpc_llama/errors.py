"""Errors the command-line scripts turn into one line on stderr and exit code 2."""


class MpcacheError(ValueError):
    """Base class: bad user input (settings, files, prompts), never a bug."""


class ConfigError(MpcacheError):
    """An impossible or unsupported configuration."""


class CheckpointError(MpcacheError):
    """A missing, corrupt or unsupported checkpoint."""
