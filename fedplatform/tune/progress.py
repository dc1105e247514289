"""A sweep's progress on the `fedplatform` log (the CLI's stderr), so a long sweep shows where it
stands between Tune's header and the final table: one line when a trial starts, ends, fails or is
restarted, and every `STATUS_EVERY_S` while trials run, their rounds and the best result so far."""
from __future__ import annotations

import logging
import os
import time

from ray import cloudpickle, tune

from fedplatform.tune.trial import trial_name

log = logging.getLogger("fedplatform.sweep")
STATUS_EVERY_S = 60.0


def error_line(error: BaseException) -> str:
    """The trial's own exception from Tune's wrapper: 'Type: first line of its message', and its
    last line when there are more (the end of a traceback it carries)."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()] or [""]
    return f"{type(cause).__name__}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else "")


class TrialLines(tune.Callback):
    def __init__(self, keys: list[str], rounds: int, metric: str, mode: str, total: int):
        self.keys, self.rounds, self.metric, self.mode, self.total = keys, rounds, metric, mode, total
        self.status_at = 0.0

    def setup(self, **info):
        self.status_at = time.monotonic() + STATUS_EVERY_S  # also in a resumed sweep's new process

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        running = [t for t in trials if t.status == "RUNNING"] if now >= self.status_at else []
        if not running:
            return
        self.status_at = now + STATUS_EVERY_S
        at = ", ".join(f"{(t.last_result or {}).get('round', 0)}/{t.config.get('rounds', self.rounds)}"
                       for t in running)
        scored = [t for t in trials if isinstance((t.last_result or {}).get(self.metric), (int, float))]
        best = (max if self.mode == "max" else min)(scored, key=lambda t: t.last_result[self.metric], default=None)
        log.info("sweep: %d of %d trials ended, %d running (at rounds %s)%s",
                 sum(t.status in ("TERMINATED", "ERROR") for t in trials), self.total, len(running), at,
                 f"; best {self.metric} so far {best.last_result[self.metric]:.4f} (trial {best.trial_id})"
                 if best else "")

    def _say(self, trial, what: str, trials: list, ended: bool = False) -> None:
        """`ended`: this trial has ended, though Tune has not marked it yet."""
        done = {t for t in trials if t.status in ("TERMINATED", "ERROR")} | ({trial} if ended else set())
        name = trial_name(trial.config, self.keys)
        log.info("trial %s%s %s (%d of %d ended)", trial.trial_id, f" ({name})" if name else "", what,
                 len(done), self.total)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(trial, "started", trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if "round" not in result:  # a trial that never reported (a sweep stopped before it ran)
            return
        done, of = int(result["round"]), int(trial.config.get("rounds", self.rounds))
        what = "finished" if done >= of else f"stopped early at round {done} of {of}"
        if isinstance(result.get(self.metric), (int, float)):
            what += f", {self.metric} {result[self.metric]:.4f}"
        self._say(trial, what, trials, ended=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(trial, f"failed ({_error(trial)}); Tune restarts it from its last checkpoint", trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, f"failed: {_error(trial)}", trials, ended=True)


def _error(trial) -> str:
    """The trial's last error, from the file Tune has just written on this node (its copy in the
    sweep's storage comes later)."""
    path = trial.pickled_error_file
    if path is None or not os.path.exists(path):
        return "its error was not recorded"
    with open(path, "rb") as f:
        return error_line(cloudpickle.load(f))
