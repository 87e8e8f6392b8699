"""Where things are on a router: its NIC names and the directories its service configs live in."""

from __future__ import annotations

import re
from dataclasses import dataclass

from backend.errors import InvalidInput

_IFNAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,14}")
_DIR = re.compile(r"/[A-Za-z0-9._/-]{0,200}")


@dataclass(frozen=True)
class RouterInterfaces:
    """NIC names by role. Our engine lays a router's NICs out as eth0 control (link-local),
    eth1 guest, eth2 public (CloudStack's isolated-network VR uses eth0 guest, eth1 control,
    eth2 public; pass those to render for it)."""

    control: str = "eth0"
    guest: str = "eth1"
    public: str = "eth2"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for role in ("control", "guest", "public"):
            name = getattr(self, role)
            if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
                raise InvalidInput(f"interfaces.{role}", f"{name!r} is not an interface name")
            if name in seen:
                raise InvalidInput(f"interfaces.{role}", f"{name} is given for two roles")
            seen.add(name)


@dataclass(frozen=True)
class RouterPaths:
    """Directories the rendered files refer to each other by: configs, and state (leases)."""

    config_dir: str = "/etc/sysvm/router"
    state_dir: str = "/var/lib/sysvm/router"

    def __post_init__(self) -> None:
        for key in ("config_dir", "state_dir"):
            value = getattr(self, key)
            if not isinstance(value, str) or not _DIR.fullmatch(value) or "/../" in value + "/":
                raise InvalidInput(f"paths.{key}", f"{value!r} is not a plain absolute directory")

    def config(self, name: str) -> str:
        return f"{self.config_dir.rstrip('/')}/{name}"

    def state(self, name: str) -> str:
        return f"{self.state_dir.rstrip('/')}/{name}"
