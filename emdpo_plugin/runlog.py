"""Logs: `<run>/run.log` holds every summary line the terminal shows, on the driver rank only.

Progress bars (tqdm) vanish when done; what stays is one line per stage (runner) and per EM
iteration (time, log-likelihood, eta, ETA for the rest of the stage), written with `info`
above any live bar and into run.log with a timestamp. Worker ranks under a launcher never
open the file (they run no stages), so no two processes write it.
"""

from __future__ import annotations

import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

LOGGER = logging.getLogger("emdpo_plugin")
LOG_FILE = "run.log"
_MARKUP = re.compile(r"\[/?[a-z ]*\]")  # rich style tags such as [bold green] ... [/]


class _TerminalHandler(logging.Handler):
    """Print above live progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)


def info(message: str, *, terminal: bool = True) -> None:
    """A summary line: the terminal (unless `terminal=False`, for lines the caller printed with
    rich styling itself) and run.log."""
    LOGGER.info(_MARKUP.sub("", message), extra={"terminal": terminal})


def warn(message: str) -> None:
    """A warning line: the terminal and run.log during a run, stderr otherwise."""
    LOGGER.warning(_MARKUP.sub("", message))


@contextmanager
def run_logging(run_dir: Path) -> Iterator[Path]:
    """Attach run.log (appended to on --resume) and the terminal handler for one run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_FILE
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    terminal = _TerminalHandler()
    terminal.addFilter(lambda r: getattr(r, "terminal", True))
    old_level, old_propagate = LOGGER.level, LOGGER.propagate
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    LOGGER.addHandler(file_handler)
    LOGGER.addHandler(terminal)
    try:
        yield path
    finally:
        for h in (file_handler, terminal):
            LOGGER.removeHandler(h)
        file_handler.close()
        LOGGER.setLevel(old_level)
        LOGGER.propagate = old_propagate


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12.3s`: how long, for a human."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"
