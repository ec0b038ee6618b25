"""What every `make bench-*` shares: its section of docs/benchmarks.md between its own
markers, the command line that produced it, and the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench-{name}:start -->", f"<!-- bench-{name}:end -->"


def write_section(name: str, section: str, after: str | None = None, doc: Path = DOC) -> None:
    """Put ``section`` between the ``bench-<name>`` markers of ``doc``.

    Replaces what is there; without the markers, the section goes right after the
    ``bench-<after>`` section (or at the end). The rest of the file is left as it is.
    """
    start, end = markers(name)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{section.strip()}\n{end}"
    if (start in text) != (end in text):
        raise SystemExit(f"{doc} has only one of {start} and {end}; fix it by hand")
    anchor = markers(after)[1] if after else None
    if start in text:
        head, _, rest = text.partition(start)
        text = head + block + rest.partition(end)[2]
    elif anchor and anchor in text:
        head, _, tail = text.partition(anchor)
        tail = tail.lstrip("\n")
        text = f"{head}{anchor}\n\n{block}\n" + (f"\n{tail}" if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote the {name} section of {doc}", file=sys.stderr)


def command(script: str, target: str, argv: list[str]) -> str:
    """The command line that produced the results, in Markdown."""
    python = Path(sys.executable)
    if python.is_relative_to(REPO):
        python = python.relative_to(REPO)
    line = shlex.join([str(python), script, *argv])
    return f"`{line}`" if argv else f"`make {target}` (= `{line}`)"


def machine() -> str:
    """CPUs, RAM, Python and the date, for the line under a table."""
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs{mem}, {platform.python_implementation()} {platform.python_version()}, "
            f"measured {datetime.date.today().isoformat()}")


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"
