"""The errors fdnm-jax raises for what a user gave it: one project type, `FdnmError`, and its kinds.

`main.py` (and the other command-line tools) print an `FdnmError` as one line, `error: <message>`, and exit 1:
its message names the thing that is wrong (a config field, a file, a step) and the fix. Every other exception is
an internal error (a bug, a library failure) and keeps its traceback, so a problem in the code is never disguised
as a user mistake.

Each kind also derives from the built-in exception it refines (`ConfigError` is a `ValueError`, `MissingFileError`
a `FileNotFoundError`, ...), so callers that catch the built-in types keep working.

This module imports nothing: the input pipeline (which knows nothing of JAX) raises these types too.
"""


class FdnmError(Exception):
  """A problem with the user's input (config, data, workdir, checkpoint, command line); the message says the fix."""


class ConfigError(FdnmError, ValueError):
  """A config field has a bad value, or fields contradict each other (the message names the fields)."""


class DataError(FdnmError, ValueError):
  """A data set's content is wrong: a malformed list file, a corrupt image, too few identities."""


class MissingFileError(FdnmError, FileNotFoundError):
  """A file or folder the run needs does not exist (a data set's layout, a workdir's config, a checkpoint)."""


class WorkdirError(FdnmError, PermissionError):
  """The workdir cannot be used as asked: not writable, or it holds another run (the message lists the fields)."""


class CheckpointError(FdnmError, ValueError):
  """A checkpoint cannot be used: unreadable, from another model, or the disk is full while saving."""


class NonFiniteLossError(FdnmError, FloatingPointError):
  """A loss term became NaN or infinite during training (the message names the step and the term)."""


class FlagError(FdnmError, ValueError):
  """A command-line flag has a bad value (the message names the flag and what it accepts)."""


class MissingDependencyError(FdnmError, ImportError):
  """An optional package a feature needs is not installed (the message says what to install or do instead)."""
