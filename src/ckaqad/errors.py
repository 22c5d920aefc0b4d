"""Every error type the user can fix. `cli.main` is the one place that catches them: it prints
`ckaqad: error: …` on one line and exits with code 2. Other exceptions are bugs and keep their traceback."""


class CkaqadError(Exception):
    """Base class: a problem with the user's input, config or files, reported in one line."""


class ConfigError(CkaqadError):
    """A flag, config value or name (format, scheme, objective, task) that is not valid."""


class FormatError(CkaqadError):
    """A tensor or model that a number format cannot represent (shape, dtype, block size)."""


class ModelError(CkaqadError):
    """A model path that is missing, unreadable, or not a causal language model."""


class DataError(CkaqadError):
    """A data file or directory that is missing, unreadable, empty or too short."""


class CheckpointError(CkaqadError):
    """A run, student or checkpoint directory that is missing, incomplete or does not match the config."""


class ExportError(CkaqadError):
    """An export that cannot be written or read back."""


class TrainingError(CkaqadError):
    """Training cannot continue (for example, the loss stayed non-finite)."""


class LostPeerError(TrainingError):
    """A collective failed because another process of the job died, closed its connection or stopped answering.
    The process group cannot be left cleanly after this (a backend thread may still wait on that peer), so
    `cli.main` ends the process right after printing the error."""


class MissingDependencyError(CkaqadError):
    """An optional package that a command needs is not installed; the message says how to install it."""


class DiskFullError(CkaqadError):
    """A write ran out of space (or quota); the message names the path."""
