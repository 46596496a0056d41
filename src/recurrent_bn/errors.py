"""Errors a user can cause and fix: the entry points print them as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, files) whose message says what to do."""


class ConfigError(UserError):
    """A config value is not allowed: the message names the key and what is allowed."""


class DataNotFoundError(UserError):
    """A dataset file is missing: the message names the file, the folder searched and how to get it."""


class DataCorruptError(UserError):
    """A dataset file is present but fails its checksum or format check."""


class InputError(ValueError, RuntimeError):
    """An input or state a layer or cell cannot take (its shape, its lengths): a ValueError whose message says what
    is expected, and a RuntimeError too, which is what torch.nn.LSTM raises for the same mistakes, so code written
    for it catches ours."""
