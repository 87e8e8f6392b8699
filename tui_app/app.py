"""The sysvm console: a keyboard-driven Textual app over `EngineAPI` (and nothing else)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import reactive

from backend.errors import EngineUnavailable, SysvmError
from tui_app.engine_link import EngineLink
from tui_app.screens.help import HelpScreen, collect_help
from tui_app.screens.main import MainScreen

if TYPE_CHECKING:
    from textual.screen import Screen

    from backend.api.protocol import EngineAPI
    from backend.api.types import EventRecord, JobInfo, StatusTree

SnapshotListener = Callable[["StatusTree", "list[JobInfo]"], None]
EventListener = Callable[["EventRecord"], None]

ASCII_KEYS = {"up": "up", "down": "down", "left": "left", "right": "right", "enter": "enter"}


class SysvmApp(App[None]):
    """Zones, system VMs, networks and jobs of one engine, live."""

    CSS_PATH = "app.tcss"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (120, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]
    # Actions that change the cloud; read-only mode removes their keys (not just greys them).
    MUTATING_ACTIONS: ClassVar[frozenset[str]] = frozenset()

    RECONNECT_SECONDS: ClassVar[float] = 1.0
    """First wait before reattaching to a lost engine (doubling up to 10 s)."""

    connected: reactive[bool | None] = reactive(None)
    """None until the engine first answers or fails; then whether it is attached."""

    def __init__(
        self, api: EngineAPI, *, read_only: bool = False, ascii: bool = False, title: str = "sysvm"
    ) -> None:
        super().__init__()
        self.api = api
        self.read_only = read_only
        self.ascii = ascii
        self.title = title
        self.disconnect_reason = ""
        self.reconnect_seconds = self.RECONNECT_SECONDS
        self._snapshot_listeners: list[SnapshotListener] = []
        self._event_listeners: list[EventListener] = []
        self._last_snapshot: tuple[StatusTree, list[JobInfo]] | None = None
        self._link: EngineLink | None = None
        self._muted_handlers: list[tuple[logging.Logger, logging.Handler]] = []
        if ascii:
            self.add_class("-ascii")

    def get_default_screen(self) -> Screen[Any]:
        return MainScreen()

    def on_mount(self) -> None:
        self._mute_terminal_logging()

    def on_unmount(self) -> None:
        for logger, handler in self._muted_handlers:
            logger.addHandler(handler)
        self._muted_handlers.clear()

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

    def _deliver_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        self._last_snapshot = (status, jobs)
        for listener in list(self._snapshot_listeners):
            listener(status, jobs)

    def _deliver_event(self, event: EventRecord) -> None:
        for listener in self._event_listeners:
            listener(event)

    def _connection_changed(self, connected: bool, reason: str) -> None:
        self.disconnect_reason = "" if connected else reason
        self.connected = connected

    def report_engine_error(self, exc: BaseException) -> None:
        """Show an engine error in words: a lost engine raises the banner, others a toast."""
        if isinstance(exc, EngineUnavailable):
            self._connection_changed(False, str(exc))
        elif isinstance(exc, SysvmError):
            self.notify(str(exc), title="engine", severity="error", timeout=8)
        else:
            self.notify(f"{type(exc).__name__}: {exc}", title="engine", severity="error", timeout=8)

    # -- keys ----------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.read_only and action in self.MUTATING_ACTIONS:
            return False
        return True

    def get_key_display(self, binding: Binding) -> str:
        if self.ascii and not binding.key_display:
            key = binding.key.split(",")[0].strip()
            if key in ASCII_KEYS:
                return ASCII_KEYS[key]
        return super().get_key_display(binding)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
            return
        self.push_screen(HelpScreen(collect_help(self.screen), title=self.title))

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
