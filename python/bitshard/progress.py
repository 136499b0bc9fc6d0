"""Progress reporting for long operations: tqdm bars, or a callback.

``progress=`` arguments across bitshard accept:

* ``None``: bars on stderr when stderr is a terminal, nothing otherwise;
* ``True`` / ``False``: bars always / never;
* a callable ``progress(stage, done, total)``: no bars; called on the
  driver after each step with the stage name (``"train"``, ``"encode"``,
  ``"merge"``, ``"commit"``), the amount done so far and the total (rows for
  ``"encode"``, merges for ``"merge"``, steps otherwise). An exception raised
  by the callback stops the operation (a resumable build keeps what it
  finished).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

__all__ = ["Progress", "ProgressBar"]

Callback = Callable[[str, int, int], None]


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


class ProgressBar:
    """One bar (or the callback's view of one stage). Use :meth:`update`."""

    def __init__(self, owner: "Progress", stage: str, total: int, desc: str, unit: str,
                 initial: int = 0, unit_scale: bool = False) -> None:
        self.stage = stage
        self.total = int(total)
        self.done = int(initial)
        self._owner = owner
        self._bar: Any = None
        if owner.bars:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit,
                             unit_scale=unit_scale, dynamic_ncols=True, leave=True,
                             file=sys.stderr)

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units (rows, merges, steps); calls the callback."""
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
        if self._owner.callback is not None:
            self._owner.callback(self.stage, self.done, self.total)

    def refresh(self) -> None:
        """Redraw (so the elapsed time moves while nothing completes)."""
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        """Finish the bar; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Progress:
    """The progress policy of one operation (see the module docstring)."""

    def __init__(self, progress: Any = None) -> None:
        self.callback: Optional[Callback] = None
        if callable(progress):
            self.callback = progress
            self.bars = False
        elif progress is None:
            self.bars = _stderr_is_tty()
        else:
            self.bars = bool(progress)

    def bar(self, stage: str, total: int, desc: str, unit: str = "it", initial: int = 0,
            unit_scale: bool = False) -> ProgressBar:
        """A new bar for ``stage`` with ``total`` units, starting at ``initial``."""
        return ProgressBar(self, stage, total, desc, unit, initial, unit_scale)

    @contextmanager
    def step(self, stage: str, desc: str) -> Iterator[ProgressBar]:
        """A one-step stage (a single long call): a bar whose elapsed time
        ticks twice a second until the block ends, then completes."""
        bar = self.bar(stage, 1, desc, unit="step")
        stop = threading.Event()
        ticker = None
        if bar._bar is not None:
            def tick() -> None:
                while not stop.wait(0.5):
                    bar.refresh()

            ticker = threading.Thread(target=tick, name="bitshard-progress", daemon=True)
            ticker.start()
        def stop_ticker() -> None:
            stop.set()
            if ticker is not None:
                ticker.join()

        try:
            yield bar
        except BaseException:
            stop_ticker()
            bar.close()
            raise
        stop_ticker()
        try:
            bar.update(1)
        finally:
            bar.close()

    def write(self, message: str) -> None:
        """A line of text that does not break the bars (stderr; only with bars)."""
        if self.bars:
            from tqdm.auto import tqdm  # noqa: PLC0415

            tqdm.write(message, file=sys.stderr)
