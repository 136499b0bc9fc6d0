"""Peak resident memory of processes, read from /proc (Linux; no psutil):
shared by ``bench.scale`` and ``bench.memory``."""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List


class PeakWatcher:
    """Polls /proc for the RSS of every descendant process and keeps each
    one's maximum, by pid (ru_maxrss of children is no use: Linux carries
    the parent's high-water mark across fork and exec). A poll every
    ``interval`` seconds: a peak shorter than that can be missed."""

    def __init__(self, interval: float = 0.1) -> None:
        self.peaks: Dict[int, int] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def descendants(root: int) -> List[int]:
        """Pids of every process below ``root``."""
        kids: Dict[int, List[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
        out, todo = [], [root]
        while todo:
            for c in kids.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.descendants(os.getpid()):
                rss = status_bytes(pid, "VmRSS")
                if rss is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakWatcher":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def status_bytes(pid: Any, field: str) -> Any:
    """Field ``field`` (a kB line such as VmRSS, VmHWM) of /proc/<pid>/status
    in bytes, or None when the process is gone or has no such line."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def vm_hwm() -> int:
    """This process's own peak RSS in bytes (VmHWM: reset at exec)."""
    return status_bytes("self", "VmHWM") or 0
