"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's time limit), handled as Ctrl-C is: the
    runs in flight are stopped and say ``interrupted``."""


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler (``signal.signal(signal.SIGTERM, raise_terminated)``)."""
    raise Terminated("SIGTERM")


class InitStudyError(Exception):
    """Something the user can fix: a bad option, a missing file, an unavailable device."""


class SchemeError(InitStudyError):
    """An unknown scheme, parameter or value, or a user init function that cannot be loaded."""


class DataError(InitStudyError):
    """Missing, corrupt or mismatched data files."""


class ConfigError(InitStudyError):
    """A run option outside its valid range, or an unusable device or output folder."""


class WriteError(InitStudyError):
    """A run's record could not be written (no space left, a read-only or vanished folder, no
    permission): the path and the cause, in one line."""

    def __init__(self, path, exc: OSError):
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")
        self.path = path


class AlreadyDone(Exception):
    """The run folder already holds a finished run of these very options: nothing to train.
    ``summary`` is that run's summary. Not an error (the CLI exits 0)."""

    def __init__(self, path, summary: dict):
        super().__init__(f"{path} already holds this finished run (status "
                         f"{summary.get('status')}); --overwrite trains it again")
        self.path, self.summary = path, summary


class RunFailed(InitStudyError):
    """A run crashed while training; its folder holds status ``failed`` and ``error.txt``."""


class ModelError(InitStudyError):
    """An unknown model, parameter or value, or a user's model that does not fit the seam."""
