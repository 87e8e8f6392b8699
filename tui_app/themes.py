"""The console's colours: the `theme` setting resolved to a Textual theme.

`ansi` (the default) draws with the terminal's own 16-colour palette, so the console matches
whatever scheme the operator's terminal uses; any Textual theme name (`textual-dark`, `nord`, ...)
picks fixed colours instead. `NO_COLOR` in the environment (https://no-color.org) turns colour off
whatever the theme: Textual honours it by rendering in monochrome.
"""

from __future__ import annotations

import difflib

from textual.theme import BUILTIN_THEMES

from backend.errors import ConfigError

ANSI = "ansi"
ANSI_THEME = "ansi-dark"
"""What `ansi` means: Textual's theme that keeps ANSI colours as the terminal defines them."""


def theme_names() -> list[str]:
    """Every value the `theme` setting accepts."""
    return [ANSI, *sorted(BUILTIN_THEMES)]


def console_theme(value: str, source: str = "default") -> str:
    """The Textual theme for a `theme` setting; an unknown name is refused naming its source."""
    if value == ANSI:
        return ANSI_THEME
    if value in BUILTIN_THEMES:
        return value
    close = difflib.get_close_matches(value, theme_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"theme: {value!r} (from {source}) is not a theme; {hint}"
        f"choose one of {', '.join(theme_names())}"
    )
