"""What /proc says about a process, for tests that check processes are gone."""

from __future__ import annotations

from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, process group)`` of ``pid``, or None once it has no /proc entry."""
    try:
        # The command name in parentheses may itself contain spaces or ")".
        state, ppid, pgrp = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
    except (OSError, IndexError, ValueError):
        return None
    return state, int(ppid), int(pgrp)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an exited process not reaped yet counts as gone)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")
