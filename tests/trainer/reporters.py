"""Reporters the trainer tests hand to training runs."""

from __future__ import annotations

from lrdeploy.trainer.progress import SilentReporter


class Interrupt(SilentReporter):
    """Stops the run with Ctrl-C in the first batch after epoch ``after``."""

    def __init__(self, after: int) -> None:
        self.after, self.done = after, 0

    def epoch(self, epoch, *args) -> None:
        self.done = epoch

    def batch(self, *args) -> None:
        if self.done == self.after:
            raise KeyboardInterrupt
