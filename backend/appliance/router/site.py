"""Where one router lives: its root directory and, in netns mode, its network namespace.

Local mode (no `netns`, the lab's default) touches no kernel: rule tables are recorded in a file and
reloads are recorded too. netns mode loads the tables into the namespace with the iptables
`variant` named and signals the services running there; with `services` (the netns lab's routers)
it also starts the services the bundle turns on and stops those it turns off.
Standard library only: the rollback timer builds its site from the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backend.appliance.router.rule_tables import (
    NETNS_NAME,
    VARIANTS,
    NamespaceTables,
    RecordedTables,
    RuleTables,
)
from backend.appliance.router.service_reload import (
    NamespaceServices,
    RecordedReloads,
    ServiceReloads,
    SignalledReloads,
)
from backend.appliance.router.state_dir import RouterStateDir


@dataclass(frozen=True)
class RouterSite:
    """A router's root directory, and its namespace and iptables variant in netns mode."""

    root: Path
    netns: str | None = None
    iptables: str = "iptables"
    services: bool = False

    def __post_init__(self) -> None:
        if not self.root.is_absolute():
            raise ValueError(f"router_root: {str(self.root)!r} is not an absolute directory")
        if self.netns is not None and not NETNS_NAME.fullmatch(self.netns):
            raise ValueError(f"netns: {self.netns!r} is not a network namespace name")
        if self.iptables not in VARIANTS:
            raise ValueError(f"iptables: {self.iptables!r} is not one of {', '.join(VARIANTS)}")
        if self.services and self.netns is None:
            raise ValueError("services: only a router in a network namespace runs its services")

    @property
    def mode(self) -> str:
        return "local" if self.netns is None else "netns"

    def state(self) -> RouterStateDir:
        return RouterStateDir(self.root)

    def tables(self, state: RouterStateDir) -> RuleTables:
        if self.netns is None:
            return RecordedTables(state.tables_file)
        return NamespaceTables(self.netns, self.iptables)

    def reloads(self, state: RouterStateDir) -> ServiceReloads:
        if self.netns is None:
            return RecordedReloads(state.reloads_file)
        if self.services:
            return NamespaceServices(state.state_dir, state.config_dir, self.netns)
        return SignalledReloads(state.state_dir)

    def argv(self) -> list[str]:
        """The site as command-line options of the rollback timer."""
        out = ["--root", str(self.root)]
        if self.netns is not None:
            out += ["--netns", self.netns, "--iptables", self.iptables]
        if self.services:
            out.append("--services")
        return out
