"""The sysvm console: a keyboard-driven Textual app over `EngineAPI` (and nothing else)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.command import CommandPalette, SearchIcon
from textual.reactive import reactive
from textual.scrollbar import ScrollBar, ScrollBarRender
from textual.widgets import Input

from backend.errors import EngineUnavailable, SysvmError
from tui_app.command_line import ObjectName, parse
from tui_app.commands import ObjectCommands, ViewCommands
from tui_app.engine_link import EngineLink
from tui_app.object_actions import JobCall
from tui_app.screens.command_prompt import CommandPromptScreen
from tui_app.screens.events import EventsScreen
from tui_app.screens.help import HelpScreen, collect_help
from tui_app.screens.jobs import JobsScreen
from tui_app.screens.main import MainScreen
from tui_app.screens.templates import TemplatesScreen
from tui_app.widgets.inventory_tree import InventoryItem

if TYPE_CHECKING:
    from textual.screen import Screen

    from backend.api.protocol import EngineAPI
    from backend.api.types import EventRecord, JobInfo, StatusTree

SnapshotListener = Callable[["StatusTree", "list[JobInfo]"], None]
EventListener = Callable[["EventRecord"], None]

ASCII_KEYS = {
    "↑": "up",
    "↓": "down",
    "←": "left",
    "→": "right",
    "⏎": "enter",
    "⌫": "backspace",
    "⇥": "tab",
}
VIEWS: dict[str, type[Screen[Any]]] = {
    "jobs": JobsScreen,
    "events": EventsScreen,
    "templates": TemplatesScreen,
}
FINISHED_WORDS = {"succeeded": "done", "cancelled": "cancelled"}


class AsciiScrollBarRender(ScrollBarRender):
    """Scroll bars without the eighth-block glyphs at the thumb's ends."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "] * 8
    HORIZONTAL_BARS: ClassVar[list[str]] = [" "] * 8


class SysvmApp(App[None]):
    """Zones, system VMs, networks and jobs of one engine, live."""

    CSS_PATH = "app.tcss"
    COMMANDS: ClassVar[set[Any]] = {ObjectCommands, ViewCommands}
    COMMAND_PALETTE_BINDING = "ctrl+p"
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (120, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", id="app.help"),
        # A priority binding: the prompt opens before the keys typed after `:` are routed,
        # so a fast (or pasted) `:zone zone2` lands in it. Not while typing into an input.
        Binding("colon", "command_prompt", "Command", priority=True, id="app.command"),
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding(
            "ctrl+p",
            "command_palette",
            "Go to object",
            show=False,
            priority=True,
            id="app.palette",
        ),
    ]
    MUTATING_ACTIONS: ClassVar[frozenset[str]] = frozenset(
        {
            "start_stop",
            "reboot",
            "destroy",
            "migrate",
            "restart_network",
            "cancel_job",
            "register_template",
            "upload_template",
            "cancel_transfer",
            "delete_template",
        }
    )
    """Actions that change the cloud; read-only mode removes their keys (not just greys them)."""

    RECONNECT_SECONDS: ClassVar[float] = 1.0
    """First wait before reattaching to a lost engine (doubling up to 10 s)."""

    connected: reactive[bool | None] = reactive(None)
    """None until the engine first answers or fails; then whether it is attached."""

    def __init__(
        self,
        api: EngineAPI,
        *,
        read_only: bool = False,
        ascii: bool = False,
        title: str = "sysvm",
        keymap: dict[str, str] | None = None,
        clock: bool = True,
        theme: str | None = None,
    ) -> None:
        """`keymap` maps binding ids (see `?` or `binding_ids()`) to keys, e.g.
        {"object.destroy": "X"}; `clock=False` leaves out uptimes and times (for screenshots);
        `theme` is a Textual theme name (see `tui_app.themes`; None keeps Textual's default, which
        the snapshots and screenshots use so they look the same on every terminal)."""
        super().__init__()
        if theme is not None:
            self.theme = theme
        self.api = api
        self.read_only = read_only
        self.ascii = ascii
        self.clock = clock
        self.title = title
        self.keymap = dict(keymap or {})
        self.disconnect_reason = ""
        self.reconnect_seconds = self.RECONNECT_SECONDS
        self._snapshot_listeners: list[SnapshotListener] = []
        self._event_listeners: list[EventListener] = []
        self._last_snapshot: tuple[StatusTree, list[JobInfo]] | None = None
        self._link: EngineLink | None = None
        self._muted_handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._watched_jobs: dict[int, str] = {}  # jobs this console submitted -> their words
        self._scrollbar_renderer: type[ScrollBarRender] | None = None
        self._main: MainScreen | None = None
        if ascii:
            self.add_class("-ascii")

    @property
    def main_screen(self) -> MainScreen:
        """The one main screen (the bottom of the stack)."""
        if self._main is None:
            self._main = MainScreen()
        return self._main

    def get_default_screen(self) -> Screen[Any]:
        return self.main_screen

    def on_mount(self) -> None:
        self._mute_terminal_logging()
        if self.ascii:
            self._scrollbar_renderer = ScrollBar.renderer
            ScrollBar.renderer = AsciiScrollBarRender
        if self.keymap:
            unknown = sorted(set(self.keymap) - binding_ids())
            if unknown:
                self.notify(
                    f"unknown key binding ids in [keys]: {', '.join(unknown)}",
                    title="config",
                    severity="warning",
                    timeout=10,
                )
            self.set_keymap(self.keymap)

    def on_unmount(self) -> None:
        for logger, handler in self._muted_handlers:
            logger.addHandler(handler)
        self._muted_handlers.clear()
        if self._scrollbar_renderer is not None:
            ScrollBar.renderer = self._scrollbar_renderer

    # -- the engine ----------------------------------------------------------------------------

    def add_engine_listener(self, on_snapshot: SnapshotListener, on_event: EventListener) -> None:
        """Receive every snapshot (the latest one at once, if any) and every live event."""
        self._snapshot_listeners.append(on_snapshot)
        self._event_listeners.append(on_event)
        if self._last_snapshot is not None:
            on_snapshot(*self._last_snapshot)
        if self._link is None:
            self._link = EngineLink(
                self.api,
                on_snapshot=self._deliver_snapshot,
                on_event=self._deliver_event,
                on_connection=self._connection_changed,
                retry_seconds=self.reconnect_seconds,
            )
            self.run_worker(
                self._link.run(), name="engine-link", group="engine", exit_on_error=False
            )

    def remove_engine_listener(
        self, on_snapshot: SnapshotListener, on_event: EventListener
    ) -> None:
        if on_snapshot in self._snapshot_listeners:
            self._snapshot_listeners.remove(on_snapshot)
        if on_event in self._event_listeners:
            self._event_listeners.remove(on_event)

    @property
    def last_event_id(self) -> int:
        """The newest event id seen on the live stream (0 before any)."""
        return self._link.last_event_id if self._link is not None else 0

    def _deliver_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        self._last_snapshot = (status, jobs)
        for listener in list(self._snapshot_listeners):
            listener(status, jobs)

    def _deliver_event(self, event: EventRecord) -> None:
        for listener in list(self._event_listeners):
            listener(event)
        if event.entity == "job" and event.entity_id in self._watched_jobs:
            self._job_progressed(event.entity_id, str(event.fields.get("state", "")))

    def _connection_changed(self, connected: bool, reason: str) -> None:
        self.disconnect_reason = "" if connected else reason
        self.connected = connected

    def report_engine_error(self, exc: BaseException, what: str = "") -> None:
        """Show an engine error in words: a lost engine raises the banner, others a toast."""
        if isinstance(exc, EngineUnavailable):
            self._connection_changed(False, str(exc))
            return
        message = str(exc) if isinstance(exc, SysvmError) else f"{type(exc).__name__}: {exc}"
        self.notify(
            f"{what}: {message}" if what else message,
            title="engine",
            severity="error",
            timeout=8,
        )

    # -- jobs this console asks for ------------------------------------------------------------

    def submit(self, words: str, call: JobCall) -> None:
        """Ask the engine for a job (`call(api)`); it shows in the activity strip at once, a
        refusal shows as a toast in words, and its end as a short toast."""
        self.run_worker(self._submit(words, call), group="submit", exit_on_error=False)

    async def _submit(self, words: str, call: JobCall) -> None:
        try:
            job = await call(self.api)
        except Exception as exc:
            self.report_engine_error(exc, words)
            return
        self.watch_job(words, job)

    def watch_job(self, words: str, job: JobInfo) -> None:
        """Follow a job this console started: in the activity strip, and a toast at its end."""
        self._watched_jobs[job.id] = words
        self.main_screen.strip.add_job(job)
        self._job_progressed(job.id, job.state)

    def _job_progressed(self, job_id: int, state: str) -> None:
        if state in FINISHED_WORDS:
            words = self._watched_jobs.pop(job_id, "")
            self.notify(f"{words}: {FINISHED_WORDS[state]}", title=f"job {job_id}", timeout=3)
        elif state == "failed":
            self._watched_jobs.pop(job_id, None)  # the activity strip reports failures

    # -- keys ----------------------------------------------------------------------------------

    def allows(self, action: str) -> bool:
        """False for an action that changes the cloud when the console is read-only."""
        return not (self.read_only and action in self.MUTATING_ACTIONS)

    def gate(self, screen: object, action: str, applicable: bool) -> bool | None:
        """A screen's `check_action` for an object action: gone in read-only mode; gone from
        the footer where it does not apply, but listed (disabled) while help is collected."""
        if not self.allows(action):
            return False
        if applicable:
            return True
        return None if getattr(screen, "listing_help", False) else False

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "command_prompt" and isinstance(self.focused, Input):
            return False  # `:` is a character there (the prompt's own line, a filter)
        return self.allows(action)

    def get_key_display(self, binding: Binding) -> str:
        display = super().get_key_display(binding)
        if self.ascii:
            display = ASCII_KEYS.get(display, display)
            display = display.encode("ascii", "replace").decode()
        return display

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
            return
        self.push_screen(HelpScreen(collect_help(self.screen), title=self.title))

    def action_command_prompt(self, initial: str = "") -> None:
        def chosen(line: str | None) -> None:
            if line:
                self.run_command(line)

        self.push_screen(CommandPromptScreen(self.object_names, initial=initial), chosen)

    def action_command_palette(self) -> None:
        if CommandPalette.is_open(self):
            return
        palette = CommandPalette(
            placeholder="Go to an object or a view by name", id="--command-palette"
        )
        self.push_screen(palette)
        if self.ascii:
            palette.call_after_refresh(self._ascii_palette, palette)

    @staticmethod
    def _ascii_palette(palette: CommandPalette) -> None:
        """The palette's magnifying glass becomes ">" (it has no setting for it)."""
        for icon in palette.query(SearchIcon):
            if icon.icon != ">":
                icon.icon = ">"
                icon.refresh()

    # -- going places --------------------------------------------------------------------------

    def object_names(self) -> list[ObjectName]:
        """Every object the `:` prompt and the palette can name."""
        return [
            ObjectName(i.name, i.kind, _type_word(i), i.zone)
            for i in self.main_screen.inventory.objects()
        ]

    def run_command(self, line: str) -> None:
        """Carry out a `:` line (see `tui_app.command_line`)."""
        command = parse(line)
        word, arg = command.word, command.argument
        main = self.main_screen
        if word in ("q", "quit"):
            self.exit()
        elif word in VIEWS:
            self.show_view(word)
        elif word == "help":
            self.action_help()
        elif word == "zone":
            zone = main.find_zone(arg) if arg else None
            if zone is None:
                self._warn(f"no zone {arg}" if arg else "name a zone, e.g. :zone zone1")
            else:
                self.go_to(zone)
        elif word in ("ssvm", "cpvm") or (word == "router" and not arg):
            self.back_to_main()
            main.show_only(word)
        elif word == "rules":
            self.open_rules(arg)
        elif word == "router":
            router = main.find_router(arg)
            if router is None:
                self._warn(f"no router of a network {arg}")
            else:
                self.go_to(router)
        else:
            self.jump_to_name(arg)

    def open_rules(self, name: str) -> None:
        """The router rules screen of network `name` (or of the network of router `name`)."""
        from tui_app.screens.router_rules import RouterRulesScreen

        network = self.main_screen.find_network(name) if name else None
        if network is None:
            self._warn(f"no network {name}" if name else "name a network, e.g. :rules zone1-net1")
            return
        self.back_to_main()
        self.push_screen(RouterRulesScreen(network))

    def jump_to_name(self, name: str) -> None:
        item = self.main_screen.inventory.find(name)
        if item is None:
            self._warn(f"no object named {name}")
        else:
            self.go_to(item)

    def go_to(self, item: InventoryItem) -> None:
        """Back to the main screen, cursor on `item`."""
        self.back_to_main()
        self.main_screen.jump_to(item)

    def back_to_main(self) -> None:
        while len(self.screen_stack) > 1 and self.screen is not self.main_screen:
            self.pop_screen()

    def show_view(self, name: str) -> None:
        """Switch to the jobs, events or templates screen (one at a time, over the main one)."""
        if isinstance(self.screen, VIEWS[name]):
            return
        self.back_to_main()
        self.push_screen(VIEWS[name]())

    def _warn(self, message: str) -> None:
        self.notify(message, title=":", severity="warning", timeout=5)

    # -- logs never reach the screen -----------------------------------------------------------

    def _mute_terminal_logging(self) -> None:
        """Detach log handlers that write to the terminal while the console owns it."""
        terminal = {sys.__stderr__, sys.__stdout__}
        for logger in [logging.getLogger()] + [
            lg
            for lg in logging.Logger.manager.loggerDict.values()
            if isinstance(lg, logging.Logger)
        ]:
            for handler in list(logger.handlers):
                stream = getattr(handler, "stream", None)
                if type(handler) is logging.StreamHandler and stream in terminal:
                    logger.removeHandler(handler)
                    self._muted_handlers.append((logger, handler))


def _type_word(item: InventoryItem) -> str:
    return {"zone": "zone", "host": "host", "network": "network"}.get(item.kind, item.type_word)


def binding_ids() -> set[str]:
    """Every binding id a keymap may name (the console's own, and Textual's tree/table ones)."""
    from textual.widgets import DataTable, Tree

    from tui_app.screens.command_prompt import CommandInput
    from tui_app.screens.confirm import ConfirmScreen
    from tui_app.screens.host_picker import HostPickerScreen
    from tui_app.screens.job_details import JobDetailsScreen
    from tui_app.screens.router_diff import RouterDiffScreen
    from tui_app.screens.router_rules import RouterRulesScreen
    from tui_app.screens.rule_form import RuleFormScreen
    from tui_app.screens.template_form import TemplateFormScreen
    from tui_app.widgets.filter_input import FilterInput
    from tui_app.widgets.inventory_tree import InventoryTree
    from tui_app.widgets.record_table import RecordTable
    from tui_app.widgets.rule_table import RuleTable

    ids: set[str] = set()
    for cls in (
        SysvmApp,
        MainScreen,
        HelpScreen,
        JobsScreen,
        EventsScreen,
        TemplatesScreen,
        TemplateFormScreen,
        RouterRulesScreen,
        RuleFormScreen,
        RouterDiffScreen,
        ConfirmScreen,
        HostPickerScreen,
        JobDetailsScreen,
        CommandPromptScreen,
        CommandInput,
        FilterInput,
        InventoryTree,
        RecordTable,
        RuleTable,
        Tree,
        DataTable,
    ):
        for binding in cls.BINDINGS:
            if isinstance(binding, Binding) and binding.id:
                ids.add(binding.id)
    return ids
