"""What the console shows, as plain text: the whole screen, or the part one widget covers."""

from __future__ import annotations

import io

from rich.console import Console
from textual.app import App
from textual.widget import Widget


def screen_lines(app: App[object]) -> list[str]:
    """Every line of the terminal as the user sees it (modal screens over what is below)."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        record=True,
        legacy_windows=False,
        safe_box=False,
    )
    update = app.screen._compositor.render_update(  # noqa: SLF001 - as App.export_screenshot
        full=True,
        screen_stack=app._background_screens,  # noqa: SLF001
    )
    console.print(update)
    lines = console.export_text(styles=False).split("\n")
    return [line.ljust(width) for line in lines[:height]]


def screen_text(app: App[object]) -> str:
    return "\n".join(screen_lines(app))


def text_of(widget: Widget) -> str:
    """The text inside the widget's region of the screen (children included)."""
    region = widget.region
    lines = screen_lines(widget.app)
    return "\n".join(line[region.x : region.right] for line in lines[region.y : region.bottom])
