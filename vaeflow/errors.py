"""Errors the user can fix: the CLI prints their message and exits non-zero, without a traceback."""


class VaeflowError(Exception):
    """Base class of every error caused by the user's input (config, data, names)."""


class ConfigError(VaeflowError, ValueError):
    """A configuration value is wrong: unknown name, impossible size, incompatible options."""


class DataError(VaeflowError, ValueError):
    """A data set is missing, malformed, or does not fit the model (shape, support, NaN)."""


class CheckpointError(VaeflowError, ValueError):
    """A checkpoint is missing, unreadable, unsafe to load, or of another model."""


class TrainingDiverged(VaeflowError, ArithmeticError):
    """Training produced non-finite or exploding parameters; the last good checkpoint is kept."""


class RunFolderError(VaeflowError):
    """The run's folder went away while the run was going (deleted, or its disk unmounted)."""
