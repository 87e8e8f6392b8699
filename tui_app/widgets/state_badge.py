"""How a state looks on screen: one glyph (or an ASCII token) and a colour per state."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text


@dataclass(frozen=True)
class Badge:
    """The look of one state: a glyph, its ASCII stand-in and a Rich style."""

    glyph: str
    ascii: str
    style: str


_RUNNING = Badge("●", "[R]", "green")
_STOPPED = Badge("○", "[S]", "dim")
_MOVING = Badge("◐", "[~]", "yellow")
_ERROR = Badge("✖", "[!]", "bold red")
_UNKNOWN = Badge("?", "[?]", "dim")

BADGES: dict[str, Badge] = {
    # VM states (CloudStack names)
    "Running": _RUNNING,
    "Stopped": _STOPPED,
    "Starting": _MOVING,
    "Stopping": _MOVING,
    "Expunging": _MOVING,
    "Destroyed": Badge("✖", "[x]", "dim"),
    "Error": _ERROR,
    "Unknown": _UNKNOWN,
    # host states
    "Up": Badge("●", "[U]", "green"),
    "Down": Badge("✖", "[D]", "bold red"),
    "Alert": Badge("▲", "[A]", "bold yellow"),
    "Disconnected": Badge("○", "[?]", "yellow"),
    "Maintenance": Badge("◐", "[M]", "yellow"),
    # zone and network states
    "Enabled": Badge("●", "[E]", "green"),
    "Disabled": _STOPPED,
    "Allocated": _STOPPED,
    "Implemented": _RUNNING,
    "Shutdown": _STOPPED,
}


def badge_for(state: str | None) -> Badge:
    """The badge of `state`; unknown states get a neutral question mark."""
    return BADGES.get(state or "Unknown", _UNKNOWN)


def state_glyph(state: str | None, *, ascii: bool = False) -> Text:
    """Just the coloured glyph, e.g. a green ● (or [R] in ASCII mode)."""
    badge = badge_for(state)
    return Text(badge.ascii if ascii else badge.glyph, style=badge.style)


def state_prefix(state: str | None, *, ascii: bool = False) -> Text:
    """The glyph and one space in one coloured run ("● "), to start a label with: as a single
    run the space survives renderers that drop a leading space of the next run."""
    badge = badge_for(state)
    return Text((badge.ascii if ascii else badge.glyph) + " ", style=badge.style)


def state_text(state: str | None) -> Text:
    """The state word in its colour ("Running" in green)."""
    badge = badge_for(state)
    return Text(state or "Unknown", style=badge.style)
