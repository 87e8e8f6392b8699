"""The live inventory: zones -> hosts, system VMs, networks -> router and guest VMs.

Built once from `EngineAPI.status()`, then patched in place from events: an event changes the
label of the one node it names, a "created" event adds one item (and its node, if its parent is
open), a "deleted" event removes one. Nodes are made lazily, when their parent is first opened,
so 10,000 objects cost nodes only for what is on view.
Events are queued and applied at most once per frame, so a burst of thousands costs one repaint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from tui_app.widgets.state_badge import state_prefix, state_text

if TYPE_CHECKING:
    from backend.api.types import EventRecord, StatusTree

Key = tuple[str, str]
"""(entity, name): how events name an object, e.g. ("system_vm", "s-1-VM")."""

FRAME_SECONDS = 1 / 30
INVENTORY_ENTITIES = frozenset({"zone", "host", "system_vm", "network", "guest_vm"})
ASCII_GUIDES = ("  ", "| ", "`-", "|-")

# Kinds of item; the first five are containers, the rest leaves.
ZONE, GROUP, NETWORK = "zone", "group", "network"
HOST, SYSTEM_VM, ROUTER, GUEST_VM = "host", "system_vm", "router", "guest_vm"
CONTAINERS = frozenset({ZONE, GROUP, NETWORK})

GROUP_TITLES = {"hosts": "Hosts", "system_vms": "System VMs", "networks": "Networks"}
TYPE_WORDS = {"ssvm": "SSVM", "cpvm": "CPVM", "router": "router"}


@dataclass(eq=False)
class InventoryItem:
    """One object of the inventory (or a group heading) and the tree node showing it, if shown."""

    key: Key
    kind: str
    zone: str
    data: dict[str, Any]
    parent: InventoryItem | None = field(default=None, repr=False)
    children: list[InventoryItem] = field(default_factory=list, repr=False)
    node: TreeNode[InventoryItem] | None = field(default=None, repr=False)
    expanded: bool = False

    @property
    def name(self) -> str:
        return str(self.data.get("name") or self.key[1])

    @property
    def state(self) -> str | None:
        return self.data.get("state")

    @property
    def type_word(self) -> str:
        """What the object is, as an operator says it (SSVM, CPVM, router, host, ...)."""
        if self.kind in (SYSTEM_VM, ROUTER):
            return TYPE_WORDS.get(str(self.data.get("type")), str(self.data.get("type", "")))
        return {GUEST_VM: "guest VM", GROUP: "group"}.get(self.kind, self.kind)

    @property
    def incomplete(self) -> bool:
        """Placed from an event, it lacks what only the status tree has (address, URI)."""
        if self.kind in (SYSTEM_VM, ROUTER):
            return not self.data.get("control_ip") or not self.data.get("host")
        if self.kind == GUEST_VM:
            return not self.data.get("ip")
        return self.kind == HOST and not self.data.get("uri")

    def search_text(self) -> str:
        """What a filter matches: name, type, state and addresses (lower case)."""
        words = [self.name, self.type_word, self.data.get("type"), self.state]
        words += [self.data.get(k) for k in ("ip", "control_ip", "cidr")]
        if self.data.get("drift"):
            words.append("drift")
        return " ".join(str(w) for w in words if w).lower()

    def walk(self) -> Iterator[InventoryItem]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class InventoryFilter:
    """A substring filter; a leading `!` inverts it."""

    needle: str = ""
    inverted: bool = False

    @classmethod
    def parse(cls, text: str) -> InventoryFilter:
        text = text.strip()
        inverted = text.startswith("!")
        return cls(text[1:].strip().lower() if inverted else text.lower(), inverted)

    @property
    def active(self) -> bool:
        return bool(self.needle)

    def matches(self, item: InventoryItem) -> bool:
        """Does the item match by itself? (Containers never match an inverted filter.)"""
        if self.inverted:
            return item.kind not in (ZONE, GROUP) and self.needle not in item.search_text()
        return self.needle in item.search_text()


class InventoryTree(Tree[InventoryItem]):
    """Zones, their hosts, system VMs and networks, kept live from engine events."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("down", "cursor_down", "Down", show=False, id="tree.cursor_down"),
        Binding("up", "cursor_up", "Up", show=False, id="tree.cursor_up"),
        Binding("j", "cursor_down", "Move", show=False, id="tree.cursor_down_vi"),
        Binding("k", "cursor_up", "Up", show=False, id="tree.cursor_up_vi"),
        Binding("g,home", "scroll_home", "Top", show=False, id="tree.top"),
        Binding("G,end", "scroll_end", "Bottom", show=False, id="tree.bottom"),
        Binding("enter", "select_cursor", "Open/close", show=False, id="tree.toggle"),
    ]

    class Changed(Message):
        """Items changed (labels, data, additions, removals) in the last applied batch."""

        def __init__(self, tree: InventoryTree, items: frozenset[InventoryItem]) -> None:
            super().__init__()
            self.tree = tree
            self.items = items

        @property
        def control(self) -> InventoryTree:
            return self.tree

    class NeedsStatus(Message):
        """An event named an object this tree cannot place; fetch status and `apply_status`."""

    def __init__(self, *, ascii: bool = False, id: str | None = None) -> None:
        super().__init__("inventory", id=id)
        self.show_root = False
        self.guide_depth = 3
        self.ascii = ascii
        if ascii:
            self.ICON_NODE = "+ "
            self.ICON_NODE_EXPANDED = "- "
            self.LINES = {"default": ASCII_GUIDES, "bold": ASCII_GUIDES, "double": ASCII_GUIDES}
        self.loaded = False
        self._items: dict[Key, InventoryItem] = {}
        self._zones: list[InventoryItem] = []
        self._by_id: dict[tuple[str, int], Key] = {}
        self._zone_ids: dict[int, str] = {}
        self._network_ids: dict[int, str] = {}
        self._pending: list[EventRecord] = []
        self._flush_timer_armed = False
        self._filter = InventoryFilter()
        self._expansion_before_filter: dict[Key, bool] = {}
        self._changed: set[InventoryItem] = set()
        self._dirty_zones: set[str] = set()  # zones whose shown nodes may no longer fit the filter
        self.applied_events = 0
        self.batches = 0  # how many times queued events were applied (at most one per frame)

    # -- reading --------------------------------------------------------------------------------

    def item(self, entity: str, name: str) -> InventoryItem | None:
        """The item an event for (entity, name) would change, if the tree knows it."""
        return self._items.get((entity, name))

    def node_for(self, entity: str, name: str) -> TreeNode[InventoryItem] | None:
        """The tree node showing (entity, name), or None if unknown, filtered out, or under a
        node that was never opened."""
        item = self._items.get((entity, name))
        return item.node if item else None

    @property
    def zones(self) -> list[InventoryItem]:
        return list(self._zones)

    def objects(self) -> Iterator[InventoryItem]:
        """Every object of the inventory (zones, hosts, VMs, networks; not group headings)."""
        return (i for i in self._iter_items() if i.kind != GROUP)

    def find(self, name: str) -> InventoryItem | None:
        """The object called `name` (exact, else case-insensitive, else a unique prefix)."""
        objects = list(self.objects())
        for exact in (True, False):
            for item in objects:
                if item.name == name if exact else item.name.lower() == name.lower():
                    return item
        prefixed = [i for i in objects if i.name.lower().startswith(name.lower())]
        return prefixed[0] if len(prefixed) == 1 else None

    @property
    def selected(self) -> InventoryItem | None:
        """The item under the cursor (None if the tree is empty)."""
        node = self.cursor_node
        return node.data if node is not None else None

    def jump_to(self, item: InventoryItem) -> bool:
        """Open the way to `item` and put the cursor on it; False if it is filtered out."""
        if self._filter.active and item.node is None:
            return False  # while filtering, everything shown has its node
        self.expand_path(*item.key)
        if item.node is None:
            return False
        self.last_line  # noqa: B018 - rebuilds the line index so node lines are current
        self.move_cursor(item.node, animate=False)
        self.scroll_to_node(item.node, animate=False)
        return True

    @property
    def filter_text(self) -> str:
        f = self._filter
        return ("!" if f.inverted else "") + f.needle

    def counts(self) -> dict[str, tuple[int, int]]:
        """(up, total) per kind of object, for the title bar."""
        out = {k: [0, 0] for k in ("zones", "hosts", "system_vms", "networks", "vms")}
        bucket = {
            ZONE: "zones",
            HOST: "hosts",
            SYSTEM_VM: "system_vms",
            ROUTER: "system_vms",
            NETWORK: "networks",
            GUEST_VM: "vms",
        }
        for item in self._items.values():
            name = bucket.get(item.kind)
            if name is None:
                continue
            out[name][1] += 1
            if item.state in ("Running", "Up", "Enabled") or item.kind == NETWORK:
                out[name][0] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    # -- the snapshot ---------------------------------------------------------------------------

    def apply_status(self, status: StatusTree) -> None:
        """Merge a status snapshot: add what is new, update what changed, drop what is gone.

        The first call builds the tree; later calls (after a reconnect, or for an object an
        event could not place) patch it, keeping nodes, selection and expansion."""
        first = not self.loaded
        seen: set[Key] = set()

        def keep(
            entity: str, name: str, kind: str, parent: InventoryItem | None, data: dict[str, Any]
        ) -> InventoryItem:
            zone = parent.zone if parent is not None else name
            item = self._ensure((entity, name), kind, zone, parent, data)
            seen.add(item.key)
            if isinstance(data.get("id"), int):  # ids let events name what they are about
                self._by_id[(entity, data["id"])] = item.key
            return item

        for zone in status["zones"]:
            zname = zone["name"]
            zdata = {"name": zname, "state": zone["state"], "id": zone.get("id")}
            z = keep("zone", zname, ZONE, None, zdata)
            if isinstance(zone.get("id"), int):
                self._zone_ids[zone["id"]] = zname
            groups = {
                g: keep("group", f"{zname}/{g}", GROUP, z, {"name": title, "group": g})
                for g, title in GROUP_TITLES.items()
            }
            for host in zone["hosts"]:
                keep("host", host["name"], HOST, groups["hosts"], dict(host))
            # Routers show under their network, with the host and address the zone list has.
            routers = {v["name"]: dict(v) for v in zone["system_vms"] if v["type"] == "router"}
            placed: set[str] = set()
            for net in zone["networks"]:
                data = {"name": net["name"], "cidr": net["cidr"], "id": net.get("id")}
                n = keep("network", net["name"], NETWORK, groups["networks"], data)
                if isinstance(net.get("id"), int):
                    self._network_ids[net["id"]] = net["name"]
                if net["router"] is not None:
                    rname = net["router"]["name"]
                    data = {**routers.get(rname, {}), **net["router"], "type": "router"}
                    keep("system_vm", rname, ROUTER, n, data)
                    placed.add(rname)
                for vm in net["vms"]:
                    keep("guest_vm", vm["name"], GUEST_VM, n, dict(vm))
            for vm in sorted(zone["system_vms"], key=lambda v: TYPE_ORDER.get(v["type"], 2)):
                if vm["name"] not in placed:
                    keep("system_vm", vm["name"], SYSTEM_VM, groups["system_vms"], dict(vm))
        for item in [i for k, i in self._items.items() if k not in seen]:
            if item.key in self._items:
                self._drop(item)
        self.loaded = True
        self._sync_all()
        if first:
            self.ensure_cursor()
        self._relabel_changed(always=True)
        if self._pending:
            self._arm_flush()

    def _ensure(
        self, key: Key, kind: str, zone: str, parent: InventoryItem | None, data: dict[str, Any]
    ) -> InventoryItem:
        """The item for `key`, created under `parent` if new, its data updated if known."""
        item = self._items.get(key)
        if item is None:
            return self._new_item(key, kind, zone, parent, data)
        if item.parent is not parent or item.kind != kind:
            self._drop(item)
            return self._new_item(key, kind, zone, parent, data)
        if any(item.data.get(k) != v for k, v in data.items()):
            item.data.update(data)
            self._changed.add(item)
        return item

    # -- events ---------------------------------------------------------------------------------

    def queue_event(self, event: EventRecord) -> None:
        """Take an engine event; it is applied with the others of its frame."""
        if event.entity not in INVENTORY_ENTITIES:
            return
        self._pending.append(event)
        if self.loaded:
            self._arm_flush()

    def _arm_flush(self) -> None:
        if not self._flush_timer_armed:
            self._flush_timer_armed = True
            self.set_timer(FRAME_SECONDS, self._apply_pending)

    def _apply_pending(self) -> None:
        self._flush_timer_armed = False
        events, self._pending = self._pending, []
        if not events:
            return
        unplaced = False
        structural = False
        for event in events:
            result = self._apply(event)
            unplaced = unplaced or result == "unplaced"
            structural = structural or result == "structural"
        self.applied_events += len(events)
        self.batches += 1
        if structural and self._filter.active:
            self._sync_all(zones=self._dirty_zones)
        self._dirty_zones = set()
        self._relabel_changed(always=structural)
        if unplaced:
            self.post_message(self.NeedsStatus())

    def _apply(self, event: EventRecord) -> str:
        """Apply one event to the model; says "updated", "structural", "unplaced" or "ignored"."""
        fields = event.fields
        item = self._find(event)
        if item is not None:
            self._by_id[(event.entity, event.entity_id)] = item.key
            self._learn_ids(item, event)
        if event.kind == "deleted" or fields.get("state") == "Destroyed":
            if item is not None:
                self._drop(item)
                return "structural"
            # A nameless deletion of something unknown: only a fresh status can tell what went.
            return "ignored" if event.name else "unplaced"
        if item is None:
            return "structural" if self._place(event) else "unplaced"
        changes = {k: v for k, v in fields.items() if not k.endswith("_id")}
        if item.kind == NETWORK and "drift" in changes:
            self._router_drift(item, bool(changes["drift"]))
        if any(item.data.get(k) != v for k, v in changes.items()):
            item.data.update(changes)
            self._changed.add(item)
            if self._filter.active:
                self._dirty_zones.add(item.zone)
                return "structural"  # it may now match the filter, or no longer
        return "updated"

    def _router_drift(self, network: InventoryItem, drift: bool) -> None:
        """A network event says whether its router drifted: the router's node shows it."""
        for child in network.children:
            if child.kind == ROUTER and child.data.get("drift") != drift:
                child.data["drift"] = drift
                self._changed.add(child)

    def _find(self, event: EventRecord) -> InventoryItem | None:
        """The item an event is about: by name, else by an id learned from earlier events."""
        if event.name:
            item = self._items.get((event.entity, event.name))
            if item is not None:
                return item
        key = self._by_id.get((event.entity, event.entity_id))
        if key is None and event.entity == "zone" and event.entity_id in self._zone_ids:
            key = ("zone", self._zone_ids[event.entity_id])
        elif key is None and event.entity == "network" and event.entity_id in self._network_ids:
            key = ("network", self._network_ids[event.entity_id])
        return self._items.get(key) if key is not None else None

    def _learn_ids(self, item: InventoryItem, event: EventRecord) -> None:
        """Remember zone and network ids seen in events, to place later "created" events."""
        zone_id = event.fields.get("zone_id")
        if isinstance(zone_id, int):
            self._zone_ids[zone_id] = item.zone
        network_id = event.fields.get("network_id")
        if isinstance(network_id, int) and item.parent is not None and item.parent.kind == NETWORK:
            self._network_ids[network_id] = item.parent.name
        if item.kind == ZONE:
            self._zone_ids[event.entity_id] = item.name
        elif item.kind == NETWORK:
            self._network_ids[event.entity_id] = item.name

    def _place(self, event: EventRecord) -> bool:
        """Add the object a "created" (or first) event names; False if its parent is unknown."""
        f = event.fields
        name = event.name
        if not name:
            return False
        data = {k: v for k, v in f.items() if not k.endswith("_id")}
        data["name"] = name
        zone = self._zone_ids.get(f.get("zone_id")) if isinstance(f.get("zone_id"), int) else None
        if event.entity == "zone":
            self._zone_ids[event.entity_id] = name
            z = self._new_item(("zone", name), ZONE, name, None, data)
            for g, title in GROUP_TITLES.items():
                self._new_item(
                    ("group", f"{name}/{g}"), GROUP, name, z, {"name": title, "group": g}
                )
            return True
        if event.entity == "network":
            self._network_ids[event.entity_id] = name
            group = self._items.get(("group", f"{zone}/networks")) if zone else None
            if group is None:
                return False
            self._new_item(("network", name), NETWORK, group.zone, group, data)
            return True
        network_id = f.get("network_id")
        network = (
            self._items.get(("network", self._network_ids.get(network_id, "")))
            if isinstance(network_id, int)
            else None
        )
        if event.entity == "guest_vm":
            if network is None:
                return False
            self._new_item(("guest_vm", name), GUEST_VM, network.zone, network, data)
            return True
        if event.entity == "system_vm":
            if f.get("type") == "router" and network_id is not None:
                if network is None:
                    return False
                self._new_item(("system_vm", name), ROUTER, network.zone, network, data)
                return True
            group = self._items.get(("group", f"{zone}/system_vms")) if zone else None
            if group is None:
                return False
            self._new_item(("system_vm", name), SYSTEM_VM, group.zone, group, data)
            return True
        if event.entity == "host":
            group = self._items.get(("group", f"{zone}/hosts")) if zone else None
            if group is None:
                return False
            self._new_item(("host", name), HOST, group.zone, group, data)
            return True
        return False

    # -- the model ------------------------------------------------------------------------------

    def _new_item(
        self, key: Key, kind: str, zone: str, parent: InventoryItem | None, data: dict[str, Any]
    ) -> InventoryItem:
        item = InventoryItem(key, kind, zone, dict(data), parent)
        item.expanded = kind == ZONE or (kind == GROUP and data.get("group") == "system_vms")
        siblings = parent.children if parent is not None else self._zones
        index = _sibling_index(item, siblings)
        siblings.insert(index, item)
        last = index == len(siblings) - 1
        self._items[key] = item
        self._dirty_zones.add(zone)
        if parent is not None:
            self._changed.add(parent)  # group counts
        if not self._filter.active:  # while filtering, new items wait for `_sync_all`
            self._show_item(item, append=last)
        return item

    def _drop(self, item: InventoryItem) -> None:
        self._hide_item(item)
        siblings = item.parent.children if item.parent is not None else self._zones
        if item in siblings:
            siblings.remove(item)
        for gone in list(item.walk()):
            self._items.pop(gone.key, None)
            self._changed.discard(gone)
        if item.parent is not None:
            self._changed.add(item.parent)

    # -- nodes ----------------------------------------------------------------------------------

    def _show_item(self, item: InventoryItem, *, append: bool = False) -> None:
        """Create the node of `item` in model order, if its parent's node exists and is open.

        Nodes are made lazily: what is under a closed node gets one when it is opened
        (`_materialize`), so a big inventory costs nodes only for what has been seen."""
        parent_node = item.parent.node if item.parent is not None else self.root
        if parent_node is None or item.node is not None:
            return
        if item.parent is not None and not parent_node.is_expanded:
            return
        before: TreeNode[InventoryItem] | None = None
        if not append:
            siblings = item.parent.children if item.parent is not None else self._zones
            later = siblings[siblings.index(item) + 1 :]
            before = next((s.node for s in later if s.node is not None), None)
        label = self.render_item(item)
        if item.kind in CONTAINERS:
            expand = item.expanded or self._filter.active
            item.node = parent_node.add(label, item, before=before, expand=expand)
        else:
            item.node = parent_node.add_leaf(label, item, before=before)

    def _materialize(self, item: InventoryItem) -> None:
        """Give the children of an open container their nodes (and theirs, where open).
        Not while filtering: then `_sync_all` has given every shown item its node."""
        node = item.node
        if node is None or not node.is_expanded or self._filter.active:
            return
        for child in item.children:
            if child.node is None:
                self._show_item(child)
            if child.kind in CONTAINERS:
                self._materialize(child)

    def _toggle_node(self, node: TreeNode[InventoryItem]) -> None:
        """Enter / click: opening a node first makes the nodes of what it holds."""
        item = node.data
        if item is not None and node.allow_expand and not node.is_expanded:
            node.expand()
            self._materialize(item)
            return
        super()._toggle_node(node)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[InventoryItem]) -> None:
        """Opened some other way (shift+space): make the nodes now."""
        if event.node.data is not None:
            self._materialize(event.node.data)

    def _hide_item(self, item: InventoryItem) -> None:
        """Remove the node of `item` (and its children's); the cursor moves up if it was inside."""
        node = item.node
        if node is None:
            return
        cursor = self.cursor_node
        inside = cursor is not None and (cursor is node or node in _ancestors(cursor))
        if inside:
            self.last_line  # noqa: B018 - rebuilds the line index so node lines are current
            fallback = node.previous_sibling or node.parent
            if fallback is not None and not fallback.is_root:
                self.move_cursor(fallback)
            else:
                self.cursor_line = -1
        node.remove()
        for gone in item.walk():
            gone.node = None

    def _sync_all(self, *, restore_expansion: bool = False, zones: set[str] | None = None) -> None:
        """Make the shown nodes match the filter (in every zone, or only in `zones`): attach what
        should show, detach what should not. `_hide_item` moves the cursor out of what goes."""
        chosen = [z for z in self._zones if zones is None or z.zone in zones]
        visible = self._visible_set(chosen)
        for zone in chosen:
            self._sync(zone, visible, restore_expansion)

    def ensure_cursor(self) -> None:
        """Put the cursor on the first line if it is on none (e.g. the first zone just came)."""
        if self.cursor_node is None and self.root.children:
            self.last_line  # noqa: B018 - rebuilds the line index so node lines are current
            self.move_cursor(self.root.children[0])

    def _reveal_cursor(self) -> None:
        """Open the nodes above the cursor, so clearing a filter leaves you where you were."""
        cursor = self.cursor_node
        if cursor is None or cursor.data is None:
            return
        for ancestor in reversed(list(_ancestors(cursor))):
            if not ancestor.is_root and not ancestor.is_expanded:
                ancestor.expand()
                if ancestor.data is not None:
                    ancestor.data.expanded = True
                    self._materialize(ancestor.data)

    def _cursor_to_match(self) -> None:
        """After a filter change: stay on a matching cursor, else go to the first match."""
        self.last_line  # noqa: B018 - rebuilds the line index so node lines are current
        cursor = self.cursor_node
        if cursor is not None and cursor.data is not None and cursor.data.node is cursor:
            if not self._filter.active or self._filter.matches(cursor.data):
                return
        if not self._filter.active:
            return
        first = next((i for i in self._iter_items() if i.node and self._filter.matches(i)), None)
        if first is not None and first.node is not None:
            self.move_cursor(first.node)

    def _sync(
        self, item: InventoryItem, visible: set[InventoryItem] | None, restore_expansion: bool
    ) -> None:
        if visible is not None and item not in visible:
            self._hide_item(item)
            return
        if item.node is None:
            self._show_item(item)
        elif item.kind in CONTAINERS:
            # While filtering, every shown container is open; afterwards, as it was before.
            if visible is not None and not item.node.is_expanded:
                item.node.expand()
            elif restore_expansion and item.node.is_expanded != item.expanded:
                item.node.toggle()
        if item.node is None or (item.kind in CONTAINERS and not item.node.is_expanded):
            return  # closed (or under something closed): its children get nodes when opened
        for child in item.children:
            self._sync(child, visible, restore_expansion)

    def _visible_set(self, zones: list[InventoryItem]) -> set[InventoryItem] | None:
        """Items the filter shows (None: all): matches, their ancestors, and (unless inverted)
        everything under a matching zone or network."""
        f = self._filter
        if not f.active:
            return None
        out: set[InventoryItem] = set()

        def visit(item: InventoryItem, under_match: bool) -> bool:
            matched = f.matches(item)
            keep_all = under_match or (matched and not f.inverted and item.kind in CONTAINERS)
            shown = matched or keep_all
            for child in item.children:
                shown = visit(child, keep_all) or shown
            if shown:
                out.add(item)
            return shown

        for zone in zones:
            visit(zone, False)
        return out

    def _iter_items(self) -> Iterator[InventoryItem]:
        for zone in self._zones:
            yield from zone.walk()

    def _relabel_changed(self, *, always: bool = False) -> None:
        changed, self._changed = self._changed, set()
        for item in changed:
            if item.node is not None:
                item.node.set_label(self.render_item(item))
        if changed or always:
            self.post_message(self.Changed(self, frozenset(changed)))

    # -- filter ---------------------------------------------------------------------------------

    def set_filter(self, text: str) -> None:
        """Show only what matches `text` (substring of name, type, state or IP; `!` inverts)."""
        new = InventoryFilter.parse(text)
        if new == self._filter:
            return
        if new.active and not self._filter.active:
            self._expansion_before_filter = {
                i.key: i.node.is_expanded for i in self._iter_items() if i.node is not None
            }
        self._filter = new
        restore = not new.active
        if restore:
            for item in self._iter_items():
                if item.key in self._expansion_before_filter:
                    item.expanded = self._expansion_before_filter[item.key]
            self._expansion_before_filter = {}
        self._sync_all(restore_expansion=restore)
        if restore:
            self._reveal_cursor()
        self._cursor_to_match()

    # -- labels ---------------------------------------------------------------------------------

    def render_item(self, item: InventoryItem) -> Text:
        """The one-line label of an item: glyph, name, type and state, address."""
        d = item.data
        if item.kind == ZONE:
            label = Text(item.name, style="bold")
            if item.state and item.state != "Enabled":
                label.append("  ").append_text(state_text(item.state))
            return label
        if item.kind == GROUP:
            return Text.assemble(item.name, (f" ({len(item.children)})", "dim"))
        if item.kind == NETWORK:
            return Text.assemble(item.name, "  ", (str(d.get("cidr") or ""), "cyan"))
        parts: list[Any] = [state_prefix(item.state, ascii=self.ascii), item.name]
        if item.kind in (SYSTEM_VM, ROUTER):
            parts += ["  ", (item.type_word, "dim")]
        parts += ["  ", state_text(item.state)]
        if item.kind == ROUTER and d.get("drift"):
            parts += ["  ", ("! drift" if self.ascii else "≠ drift", "bold red")]
        if item.kind == GUEST_VM and d.get("ip"):
            parts += ["  ", (str(d["ip"]), "cyan")]
        return Text.assemble(*parts)

    def expand_path(self, entity: str, name: str) -> None:
        """Expand the node of (entity, name) and every node above it (making the nodes on the
        way, top down)."""
        item = self._items.get((entity, name))
        chain: list[InventoryItem] = []
        while item is not None:
            chain.append(item)
            item = item.parent
        for step in reversed(chain):
            step.expanded = True
            if step.node is None:
                self._show_item(step)
            if step.node is not None and step.kind in CONTAINERS:
                if not step.node.is_expanded:
                    step.node.expand()
                self._materialize(step)


TYPE_ORDER = {"ssvm": 0, "cpvm": 1}


def system_vms_on(host: InventoryItem) -> int:
    """How many system VMs (routers included) of the host's zone the tree places on `host`."""
    zone = host.parent.parent if host.parent is not None else None
    if zone is None:
        return 0
    return sum(
        1 for i in zone.walk() if i.kind in (SYSTEM_VM, ROUTER) and i.data.get("host") == host.name
    )


def _sibling_index(item: InventoryItem, siblings: list[InventoryItem]) -> int:
    """Where a new item goes among its siblings: a network lists its router first; system VMs
    go SSVMs first, then CPVMs (each in order of arrival); everything else is appended."""
    if item.kind == ROUTER:
        return 0
    if item.kind == SYSTEM_VM:
        rank = TYPE_ORDER.get(str(item.data.get("type")), 2)
        for i, sibling in enumerate(siblings):
            if TYPE_ORDER.get(str(sibling.data.get("type")), 2) > rank:
                return i
    return len(siblings)


def _ancestors(node: TreeNode[InventoryItem]) -> Iterable[TreeNode[InventoryItem]]:
    parent = node.parent
    while parent is not None:
        yield parent
        parent = parent.parent
