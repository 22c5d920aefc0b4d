"""Errors the user can fix. `cli.main` is the one place that catches them (exit code 2)."""


class CkaqadError(Exception):
    """Base class: a problem with the user's input, config or files, reported in one line."""


class ConfigError(CkaqadError):
    """A flag, config value or name (format, scheme, loss, task) that is not valid."""


class FormatError(CkaqadError):
    """A tensor or model that a number format cannot represent (shape, dtype, block size)."""


class ModelError(CkaqadError):
    """A model path that is missing, unreadable, or not a causal language model."""


class DataError(CkaqadError):
    """A data file or directory that is missing, unreadable, empty or too short."""


class CheckpointError(CkaqadError):
    """A run or checkpoint directory that is missing, incomplete or does not match the config."""


class ExportError(CkaqadError):
    """An export that cannot be written or read back."""


def close_matches(name: str, choices) -> str:
    """Return ' (did you mean: a, b?)' for the closest choices, or ''."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def unknown_name(kind: str, name: str, choices) -> ConfigError:
    """ConfigError for a name that is not registered, listing the valid ones."""
    return ConfigError(
        f"unknown {kind} {name!r}{close_matches(name, choices)}; choose from: {', '.join(sorted(choices))}"
    )
