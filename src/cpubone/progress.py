"""A progress bar over named steps, shared by every tool that measures for minutes (rich)."""
from __future__ import annotations

from typing import Optional

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["StepProgress"]


class StepProgress:
    """A rich progress bar over named steps (nothing when disabled or when there is nothing to do).

    ``with StepProgress(enabled, total) as step: step("label")`` marks the previous step done and shows the
    next one; ``step(None)`` closes the last. Shared by bench, blocks and the design latency table.
    """

    def __init__(self, enabled: bool, total: int, width: int = 28) -> None:
        self.enabled, self.total, self.width = enabled and total > 0, total, width
        self.bar, self.started = None, False

    def __enter__(self):
        if self.enabled:
            self.bar = Progress(TextColumn(f"{{task.description:<{self.width}}}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total)
        return self.step

    def step(self, label: Optional[str]) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.advance(self.task)
        self.started = True
        self.bar.update(self.task, description=(label or "done")[:self.width])

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
