"""The `:` command language: what the words mean and how a half-typed line completes.

`:zone z1`, `:ssvm`, `:cpvm`, `:router [NET]`, `:rules NET`, `:jobs`, `:events`, `:templates`,
`:help`, `:q`, and `:NAME` for any object. Parsing and completion are pure, so they are tested
without a screen; `SysvmApp.run_command` carries the result out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_COMPLETIONS = 10


@dataclass(frozen=True)
class CommandSpec:
    """One `:` word: its argument (if any, e.g. "ZONE"), and what it does, in a few words."""

    word: str
    argument: str
    help: str
    argument_required: bool = False


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("zone", "ZONE", "go to a zone", argument_required=True),
    CommandSpec("ssvm", "", "show only SSVMs"),
    CommandSpec("cpvm", "", "show only CPVMs"),
    CommandSpec("router", "[NETWORK]", "show only routers, or go to a network's router"),
    CommandSpec("rules", "NETWORK", "edit a network's router rules", argument_required=True),
    CommandSpec("jobs", "", "recent jobs"),
    CommandSpec("events", "", "the live event log"),
    CommandSpec("templates", "", "templates: register, upload, transfers"),
    CommandSpec("help", "", "the keys"),
    CommandSpec("q", "", "quit"),
)
BY_WORD = {c.word: c for c in COMMANDS} | {"quit": CommandSpec("quit", "", "quit")}


@dataclass(frozen=True)
class Command:
    """A parsed line: `word` is a command word, or "" when the line names an object."""

    word: str
    argument: str = ""

    @property
    def is_object(self) -> bool:
        return not self.word


@dataclass(frozen=True)
class Completion:
    """A line the prompt can complete to, and a hint shown beside it."""

    text: str
    hint: str


@dataclass(frozen=True)
class ObjectName:
    """An object the prompt can name: its name, what it is ("SSVM", "zone"), its zone."""

    name: str
    kind: str
    type_word: str
    zone: str


def parse(line: str) -> Command:
    """Split a `:` line into a command word and its argument; an unknown word is an object."""
    text = line.strip().lstrip(":").strip()
    word, _, argument = text.partition(" ")
    if word.lower() in BY_WORD:
        return Command(word.lower(), argument.strip())
    return Command("", text)


def complete(line: str, objects: Iterable[ObjectName]) -> list[Completion]:
    """What `line` may become: command words and object names that start with it, or, after
    `zone ` / `router ` / `rules `, the zones / networks that do."""
    text = line.lstrip(":")
    word, space, rest = text.partition(" ")
    low = word.lower()
    if space:
        if low == "zone":
            return _names(f"{low} ", rest, (o for o in objects if o.kind == "zone"))
        if low in ("router", "rules"):
            return _names(f"{low} ", rest, (o for o in objects if o.kind == "network"))
        return []
    out = [
        Completion(c.word + (" " if c.argument else ""), _hint(c))
        for c in COMMANDS
        if c.word.startswith(low)
    ]
    if low:
        out += _names("", word, objects)
    return out[:MAX_COMPLETIONS]


def _names(prefix: str, typed: str, objects: Iterable[ObjectName]) -> list[Completion]:
    """Objects whose name starts with `typed`, shortest first (zone1 before zone1-net1)."""
    low = typed.lower()
    hits = sorted((o for o in objects if o.name.lower().startswith(low)), key=_shortest)
    out = []
    for o in hits[:MAX_COMPLETIONS]:
        where = f" in {o.zone}" if o.zone and o.zone != o.name else ""
        out.append(Completion(prefix + o.name, f"{o.type_word}{where}"))
    return out


def _shortest(o: ObjectName) -> tuple[int, str]:
    return (len(o.name), o.name)


def _hint(spec: CommandSpec) -> str:
    return f"{spec.argument}  {spec.help}".strip() if spec.argument else spec.help
