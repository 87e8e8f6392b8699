"""The top line: the console's name, what the inventory holds, and the read-only mark."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

NOUNS = (
    ("zones", "zone", "zones"),
    ("hosts", "host", "hosts"),
    ("system_vms", "system VM", "system VMs"),
    ("networks", "network", "networks"),
    ("vms", "VM", "VMs"),
)


class TitleBar(Static):
    """`sysvm  2 zones  4 hosts  8 system VMs ...     1 VM not running  read-only`"""

    DEFAULT_CSS = """
    TitleBar {
        height: 1;
        padding: 0 1;
        background: $panel;
    }
    """

    def __init__(self, title: str, *, read_only: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.read_only = read_only
        self.counts: dict[str, tuple[int, int]] = {}

    def on_mount(self) -> None:
        self._paint()

    def set_counts(self, counts: dict[str, tuple[int, int]]) -> None:
        if counts != self.counts:
            self.counts = counts
            self._paint()

    def _paint(self) -> None:
        left = Text(self.title, style="bold", no_wrap=True, overflow="ellipsis")
        right = Text(no_wrap=True)
        if self.counts:
            for key, one, many in NOUNS:
                total = self.counts.get(key, (0, 0))[1]
                left.append(f"  {total} {one if total == 1 else many}")
            hosts_up, hosts = self.counts.get("hosts", (0, 0))
            vms_up = sum(self.counts.get(k, (0, 0))[0] for k in ("system_vms", "vms"))
            vms = sum(self.counts.get(k, (0, 0))[1] for k in ("system_vms", "vms"))
            if vms > vms_up:
                right.append(_count(vms - vms_up, "VM") + " not running", style="bold yellow")
            if hosts > hosts_up:
                right.append("  " if right else "")
                right.append(_count(hosts - hosts_up, "host") + " not up", style="bold red")
        if self.read_only:
            right.append("  " if right else "")
            right.append("read-only", style="reverse")
        grid = Table.grid(expand=True, padding=(0, 0, 0, 2))
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(left, right)
        self.update(grid)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
