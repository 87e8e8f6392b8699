"""Steps the console tests share: wait for the first snapshot, find and select objects."""

from __future__ import annotations

from typing import Any

from tui_app.app import SysvmApp
from tui_app.widgets.inventory_tree import InventoryItem, InventoryTree

SIZE = (80, 24)


def inventory(app: SysvmApp) -> InventoryTree:
    return app.main_screen.inventory


async def loaded(pilot: Any, app: SysvmApp, wait_until: Any) -> InventoryTree:
    """The inventory tree once the first status snapshot is in."""
    await wait_until(
        pilot,
        lambda: app.main_screen.is_mounted and inventory(app).loaded,
        what="the first status snapshot",
    )
    await pilot.pause()
    return inventory(app)


def system_vms_of(tree: InventoryTree, zone: str) -> list[InventoryItem]:
    item = tree.item("group", f"{zone}/system_vms")
    assert item is not None, f"{zone} has no System VMs group"
    return item.children


def zone_vm(tree: InventoryTree, zone: str, vm_type: str) -> InventoryItem:
    """The (first) SSVM or CPVM of a zone."""
    return next(v for v in system_vms_of(tree, zone) if v.data["type"] == vm_type)


async def select(pilot: Any, tree: InventoryTree, item: InventoryItem) -> None:
    """Put the cursor on `item` (opening the way to it) and let the screen follow."""
    assert tree.jump_to(item), f"{item.name} is not shown"
    tree.focus()
    await pilot.pause()


def shown_leaves(tree: InventoryTree) -> list[str]:
    """Names of the leaf objects on view: they have a node and every node above is open."""
    out = []
    stack = list(tree.root.children)
    while stack:
        node = stack.pop(0)
        if node.allow_expand:
            if node.is_expanded:
                stack[:0] = list(node.children)
        elif node.data is not None:
            out.append(node.data.name)
    return out


def all_leaves(tree: InventoryTree) -> list[str]:
    """Names of every leaf object the tree knows (shown or not)."""
    return [i.name for i in tree.objects() if i.kind not in ("zone", "network")]


def toasts(app: SysvmApp) -> list[str]:
    """The messages of the notifications (toasts) raised so far and not yet expired."""
    return [n.message for n in app._notifications]  # noqa: SLF001 - Textual keeps them here
