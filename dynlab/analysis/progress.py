"""Progress and warnings of an analysis, shared by the serial and the Dask executor."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from dynlab.errors import printable


def warn_nonfinite(checkpoint: Path, bad: Sequence[str], stacklevel: int = 3) -> None:
    """Warn that matrices of `checkpoint` held NaN/Inf (their metrics are NaN)."""
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    warnings.warn(
        f"{checkpoint}: {len(bad)} matrices hold NaN/Inf ({shown}); their metrics are NaN",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


class Progress:
    """A rich progress bar over checkpoints (silent when disabled or with nothing to do).

    `with Progress(enabled, total) as advance: advance("run step 10")` moves it by one."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and total > 0
        self.total = total

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda description: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("[bold]analyze[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
            TimeRemainingColumn(), transient=not os.environ.get("CI"),
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("", total=self.total)
        # run names are shown as they are: no markup, control characters escaped
        return lambda description: self.bar.update(self.task, advance=1,
                                                   description=printable(description))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if self.enabled:
            self.bar.__exit__(exc_type, exc, tb)
        return False
