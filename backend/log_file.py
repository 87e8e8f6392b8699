"""Where a sysvm process logs: one file under the home, never a terminal.

The engine writes `engine.log`, the console `tui.log`: a console owns the terminal, and the engine
runs detached, so a log line on a terminal would either corrupt the screen or go nowhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

QUIET_LIBRARIES = ("asyncssh", "websockets")
"""Chatty at INFO (one line per connection and channel); kept at WARNING unless DEBUG is asked."""


def log_to_file(path: Path, level: str) -> None:
    """Send every log record of this process at `level` or above to `path` (appended)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
