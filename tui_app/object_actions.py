"""Object actions: which apply to which kind of object, and the EngineAPI call each one makes.

Key handling lives in the screens; this module only decides and words things, so the rules
(`s` stops a running VM and starts a stopped one, `x` works on a network or its router, ...)
are written once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tui_app.widgets.inventory_tree import GUEST_VM, NETWORK, ROUTER, SYSTEM_VM, InventoryItem

if TYPE_CHECKING:
    from backend.api.protocol import EngineAPI
    from backend.api.types import JobInfo

START_STOP, REBOOT, DESTROY, MIGRATE, RESTART_NETWORK, EDIT_RULES, CONSOLE = (
    "start_stop",
    "reboot",
    "destroy",
    "migrate",
    "restart_network",
    "edit_rules",
    "console",
)

APPLIES_TO: dict[str, frozenset[str]] = {
    START_STOP: frozenset({SYSTEM_VM, ROUTER, GUEST_VM}),
    REBOOT: frozenset({SYSTEM_VM, ROUTER}),
    DESTROY: frozenset({SYSTEM_VM, ROUTER, GUEST_VM}),
    MIGRATE: frozenset({SYSTEM_VM, ROUTER}),
    RESTART_NETWORK: frozenset({NETWORK, ROUTER}),
    EDIT_RULES: frozenset({NETWORK, ROUTER}),
    CONSOLE: frozenset({SYSTEM_VM, ROUTER, GUEST_VM}),
}
"""Action name -> the kinds of inventory item it works on."""

OBJECT_ACTIONS = frozenset(APPLIES_TO)
SETTLING = frozenset({"Starting", "Stopping", "Migrating", "Expunging"})
AUTO_HOST = ""
"""The host picker's answer for "least loaded (auto)": the engine chooses."""

JobCall = Callable[["EngineAPI"], Awaitable["JobInfo"]]


class NotNow(Exception):
    """The action cannot be asked for in the object's present state (message says why)."""


@dataclass(frozen=True)
class ActionRequest:
    """One request to the engine: what it does in words ("stop SSVM s-4-VM") and the call."""

    words: str
    call: JobCall


def applies(action: str, item: InventoryItem | None) -> bool:
    """Does `action` work on `item`?"""
    return item is not None and item.kind in APPLIES_TO.get(action, frozenset())


def describe(item: InventoryItem) -> str:
    """The object as an operator names it: "SSVM s-4-VM", "guest VM web1", "network net-a"."""
    word = {NETWORK: "network", GUEST_VM: "guest VM"}.get(item.kind, item.type_word)
    return f"{word} {item.name}"


def network_name(item: InventoryItem) -> str:
    """The network an `x` (or `e`) on this item works on: the network itself, or the router's."""
    if item.kind == ROUTER and item.parent is not None:
        return item.parent.name
    return item.name


def start_stop(item: InventoryItem) -> ActionRequest:
    """Stop a running VM, start any other; refuse while it is on its way somewhere."""
    state = item.state or "Unknown"
    if state in SETTLING:
        raise NotNow(f"{item.name} is {state}; try again once it has settled")
    verb = "stop" if state == "Running" else "start"
    return _vm_request(item, verb)


def reboot(item: InventoryItem) -> ActionRequest:
    if item.state != "Running":
        raise NotNow(f"{item.name} is {item.state or 'Unknown'}; only a running VM reboots")
    return _vm_request(item, "reboot")


def destroy(item: InventoryItem) -> ActionRequest:
    return _vm_request(item, "destroy")


def migrate(item: InventoryItem, host: str) -> ActionRequest:
    """Move a system VM to `host` (AUTO_HOST: the least loaded other Up host of its zone)."""
    name = item.name
    where = host or "the least loaded host"

    def call(api: EngineAPI) -> Awaitable[JobInfo]:
        return api.system_vm_action(name, "migrate", host=host or None)

    return ActionRequest(f"migrate {describe(item)} to {where}", call)


def restart_network(item: InventoryItem) -> ActionRequest:
    """Restart a network with cleanup: its router is destroyed and a new one made."""
    network = network_name(item)

    def call(api: EngineAPI) -> Awaitable[JobInfo]:
        return api.network_restart(network, cleanup=True)

    return ActionRequest(f"restart network {network} with cleanup", call)


def _vm_request(item: InventoryItem, verb: str) -> ActionRequest:
    name = item.name
    if item.kind == GUEST_VM:

        def call(api: EngineAPI) -> Awaitable[JobInfo]:
            return api.guest_vm_action(name, verb)

    else:

        def call(api: EngineAPI) -> Awaitable[JobInfo]:
            return api.system_vm_action(name, verb)

    return ActionRequest(f"{verb} {describe(item)}", call)
