"""Reloading a router's services after their config files changed, and only then.

Each service has a reload signal and a pid file in the router's state directory:
dnsmasq SIGHUP (re-reads its hosts and dhcp-hosts files), haproxy SIGUSR2 (a master-worker
haproxy reloads its config), strongSwan's starter SIGUSR1 (what `ipsec reload` sends). A service
answers "reloaded" when its config changed and it was signalled, "unchanged" when its config did
not change, and "skipped" when its config changed but nothing runs to reload (not started, or the
bundle turns it off). Local mode signals nothing: it records which reloads would have happened.
A router of the netns lab also starts what is turned on and not running ("started") and stops
what the bundle turns off ("stopped"): `NamespaceServices`.
Standard library only: the rollback timer uses this.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

RELOADED = "reloaded"
UNCHANGED = "unchanged"
SKIPPED = "skipped"
STARTED = "started"
HAPROXY_MAXCONN = 20000
STOPPED = "stopped"

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

    def _signal(self, name: str, sig: int | None = None) -> bool:
        """Send `sig` (default: the reload signal; 0 asks whether it runs) to the service."""
        pid_file, reload_sig = SIGNALS[name]
        try:
            pid = int((self.state_dir / pid_file).read_text().split()[0])
            if pid <= 1:  # 0 or -1 would signal our own process group or everything
                return False
            os.kill(pid, reload_sig if sig is None else sig)
        except (OSError, ValueError, IndexError):
            return False
        return True


class NamespaceServices(SignalledReloads):
    """The netns lab's routers: dnsmasq and haproxy run in the router's namespace, started when the
    bundle turns them on, signalled when their files change, stopped when it turns them off.
    (strongSwan is not run in the lab: a VPN change is signalled as `SignalledReloads` does.)"""

    def __init__(self, state_dir: Path, config_dir: Path, netns: str) -> None:
        super().__init__(state_dir)
        self.config_dir = config_dir
        self.netns = netns

    def reload(self, changed: set[str], enabled: Mapping[str, bool]) -> dict[str, str]:
        out = super().reload(changed, enabled)
        for name in ("dnsmasq", "haproxy"):
            running = self._signal(name, 0)
            if enabled.get(name, False) and not running:
                out[name] = STARTED if self._start(name) else SKIPPED
            elif not enabled.get(name, False) and running:
                self._signal(name, signal.SIGTERM)
                (self.state_dir / SIGNALS[name][0]).unlink(missing_ok=True)
                out[name] = STOPPED
        return out

    def _start(self, name: str) -> bool:
        pid_file = str(self.state_dir / SIGNALS[name][0])
        if name == "dnsmasq":
            argv = ["dnsmasq", f"--conf-file={self.config_dir / 'dnsmasq.conf'}"]
            argv += [f"--pid-file={pid_file}", "--user=root", "--group=root"]
        else:  # master-worker: the pid file names the master, which reloads on SIGUSR2
            argv = ["haproxy", "-W", "-D", "-f", str(self.config_dir / "haproxy.cfg")]
            argv += ["-p", pid_file]
            # haproxy needs 2 descriptors a connection: cap its maxconn to what the limit allows
            argv += ["-n", str(_haproxy_maxconn())]
        with open(self.state_dir / f"{name}.log", "ab") as log:
            done = subprocess.run(
                ["ip", "netns", "exec", self.netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,  # never the command's own stdout: the SSH session would wait on it
                stderr=log,
                start_new_session=True,
                check=False,
                timeout=30,
            )
        return done.returncode == 0


def _haproxy_maxconn() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return HAPROXY_MAXCONN
    return max(64, min(HAPROXY_MAXCONN, (hard - 100) // 2))


def _statuses(changed: set[str], enabled: Mapping[str, bool]) -> dict[str, str]:
    return {
        name: (RELOADED if enabled.get(name, False) else SKIPPED) if name in changed else UNCHANGED
        for name in sorted(SIGNALS)
    }
