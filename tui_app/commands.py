"""Command palette (ctrl+p) providers: every object by name, and the views."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from tui_app.app import SysvmApp

DISCOVERY_LIMIT = 50  # objects listed before anything is typed


class ObjectCommands(Provider):
    """Jump to any zone, host, system VM, network or guest VM by (part of) its name."""

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for obj in self.sysvm.object_names()[:DISCOVERY_LIMIT]:
            yield DiscoveryHit(
                obj.name,
                partial(self.sysvm.jump_to_name, obj.name),
                help=_where(obj.type_word, obj.zone, obj.name),
            )

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for obj in self.sysvm.object_names():
            score = matcher.match(obj.name)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(obj.name),
                    partial(self.sysvm.jump_to_name, obj.name),
                    help=_where(obj.type_word, obj.zone, obj.name),
                )


class ViewCommands(Provider):
    """The screens: jobs, events, templates, help, and each network's router rules."""

    VIEWS = (
        ("Jobs", "jobs", "recent jobs, cancel one (:jobs)"),
        ("Events", "events", "the live event log (:events)"),
        ("Templates", "templates", "templates and their transfers (:templates, t)"),
        ("Help", "help", "every key (?)"),
    )

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for title, word, help_text in self.VIEWS:
            yield DiscoveryHit(title, partial(self.sysvm.run_command, word), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        views = list(self.VIEWS)
        views += [
            (f"Router rules {o.name}", f"rules {o.name}", "edit its router's rules (:rules, e)")
            for o in self.sysvm.object_names()
            if o.kind == "network"
        ]
        for title, word, help_text in views:
            score = matcher.match(title)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(title),
                    partial(self.sysvm.run_command, word),
                    help=help_text,
                )


def _where(type_word: str, zone: str, name: str) -> str:
    return f"{type_word} in {zone}" if zone and zone != name else type_word
