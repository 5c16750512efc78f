"""Errors that mean "your input is wrong": the CLI prints them as one clear line and exits 2."""


class RLHFKitError(Exception):
    """Base of every error caused by bad user input (config, data file, request)."""


class ConfigError(RLHFKitError, ValueError):
    """A bad config value, file or combination. The message says where and what was expected."""


class DataError(RLHFKitError, ValueError):
    """A malformed data file or unknown data source. The message names file, line and problem."""


class TrainingError(RLHFKitError, RuntimeError):
    """Training cannot continue (e.g. NaN loss); the last good checkpoint is kept and named."""
