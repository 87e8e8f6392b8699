"""A footer that always fits one line: when the keys of the selected object leave no room, the
general keys (filter, command prompt, quit; all listed by `?`) give way, never the object's own.

Textual's footer cuts the line at the screen's edge, so at 80x24 a router's keys pushed `? Help`
and `q Quit` out of sight, half a word at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

GIVE_WAY = ("main.filter", "app.command", "app.quit", "app.help")
"""Binding ids that leave the footer first, in this order, when it would not fit."""


class FittingFooter(Footer):
    """Footer(compact) whose keys are trimmed to the width it has."""

    def __init__(self) -> None:
        super().__init__(compact=True, show_command_palette=False)

    def _shown(self) -> list[tuple[Binding, bool, str]]:
        seen: set[str] = set()
        shown = []
        for _node, binding, enabled, tooltip in self.screen.active_bindings.values():
            if binding.show and binding.action not in seen:
                seen.add(binding.action)  # one key per action, as Footer shows it
                shown.append((binding, enabled, tooltip))
        return shown

    def _fitting(self, shown: list[tuple[Binding, bool, str]]) -> Iterator[int]:
        """Indices of `shown` that fit, dropping GIVE_WAY keys first."""
        width = self.size.width or self.app.size.width

        def cost(i: int) -> int:
            binding = shown[i][0]
            return len(self.app.get_key_display(binding)) + len(binding.description) + 2

        keep = list(range(len(shown)))
        for binding_id in GIVE_WAY:
            if sum(cost(i) for i in keep) - 1 <= width:
                break
            keep = [i for i in keep if shown[i][0].id != binding_id]
        return iter(keep)

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        shown = self._shown()
        if any(binding.group is not None for binding, _, _ in shown):
            yield from super().compose()  # grouped keys: Textual's own layout
            return
        keep = list(self._fitting(shown))
        self.styles.grid_size_columns = len(keep)
        for i in keep:
            binding, enabled, tooltip = shown[i]
            yield FooterKey(
                binding.key,
                self.app.get_key_display(binding),
                binding.description,
                binding.action,
                disabled=not enabled,
                tooltip=tooltip,
            ).data_bind(compact=Footer.compact)

    def on_resize(self, _event: events.Resize) -> None:
        if self._bindings_ready:
            self.call_after_refresh(self.recompose)
