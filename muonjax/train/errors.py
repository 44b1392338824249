"""What a run reports instead of a traceback: a value a user can get wrong
(ConfigError: one line, exit code 2), files that could not be written
(WriteFailed), and the exit code of a run stopped by a signal. The ground
floor of train/: it imports nothing."""

# sysexits' EX_TEMPFAIL: a run stopped by a signal, with nothing lost; relaunch it (the CLI's code)
EXIT_PREEMPTED = 75


class ConfigError(ValueError):
    """A bad value a user can pass: the CLI prints it on one line and exits 2."""


class WriteFailed(RuntimeError):
    """The run's files could not be written (disk full, an I/O error): the run
    stopped; its complete checkpoints are intact. The CLI prints it on one line."""
