"""User-facing errors: the CLI prints the message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the value and what is valid."""


class RunFailed(RuntimeError):
    """A run stopped because of what happened during training (a client raised, a round timed
    out); the message carries the details, e.g. the client's traceback."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose checkpoints can be resumed: carries its run id."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


class NonFinite(RunFailed):
    """A client's loss or the model state became inf/nan (runtime.allow_nonfinite=false)."""
