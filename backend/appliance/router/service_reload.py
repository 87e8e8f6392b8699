"""Reloading a router's services after their config files changed, and only then.

Each service has a reload signal and a pid file in the router's state directory:
dnsmasq SIGHUP (re-reads its hosts and dhcp-hosts files), haproxy SIGUSR2 (a master-worker
haproxy reloads its config), strongSwan's starter SIGUSR1 (what `ipsec reload` sends). A service
answers "reloaded" when its config changed and it was signalled, "unchanged" when its config did
not change, and "skipped" when its config changed but nothing runs to reload (not started, or the
bundle turns it off). Local mode signals nothing: it records which reloads would have happened.
Standard library only: the rollback timer uses this.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

RELOADED = "reloaded"
UNCHANGED = "unchanged"
SKIPPED = "skipped"

SIGNALS: Mapping[str, tuple[str, signal.Signals]] = {
    "dnsmasq": ("dnsmasq.pid", signal.SIGHUP),
    "haproxy": ("haproxy.pid", signal.SIGUSR2),
    "vpn": ("starter.charon.pid", signal.SIGUSR1),
}


def changed_services(
    service_files: Mapping[str, list[str]],
    changed_files: set[str],
    enabled_before: Mapping[str, bool],
    enabled_now: Mapping[str, bool],
) -> set[str]:
    """Services whose files changed or that the bundle turned on or off."""
    return {
        name
        for name, files in service_files.items()
        if changed_files.intersection(files)
        or enabled_before.get(name, False) != enabled_now.get(name, False)
    }


class ServiceReloads(Protocol):
    def reload(self, changed: set[str], enabled: Mapping[str, bool]) -> dict[str, str]: ...


class RecordedReloads:
    """Local mode: a reload is a line in a file (JSON: time and the services reloaded)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reload(self, changed: set[str], enabled: Mapping[str, bool]) -> dict[str, str]:
        out = _statuses(changed, enabled)
        done = sorted(n for n, s in out.items() if s == RELOADED)
        if done:
            with open(self.path, "a") as f:
                f.write(json.dumps({"at": time.time(), "reloaded": done}) + "\n")
        return out


class SignalledReloads:
    """netns mode: signal the running service named by its pid file in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def reload(self, changed: set[str], enabled: Mapping[str, bool]) -> dict[str, str]:
        out = _statuses(changed, enabled)
        for name, status in out.items():
            if status == RELOADED and not self._signal(name):
                out[name] = SKIPPED
        return out

    def _signal(self, name: str) -> bool:
        pid_file, sig = SIGNALS[name]
        try:
            pid = int((self.state_dir / pid_file).read_text().split()[0])
            if pid <= 1:  # 0 or -1 would signal our own process group or everything
                return False
            os.kill(pid, sig)
        except (OSError, ValueError, IndexError):
            return False
        return True


def _statuses(changed: set[str], enabled: Mapping[str, bool]) -> dict[str, str]:
    return {
        name: (RELOADED if enabled.get(name, False) else SKIPPED) if name in changed else UNCHANGED
        for name in sorted(SIGNALS)
    }
