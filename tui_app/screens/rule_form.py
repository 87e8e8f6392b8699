"""The form that adds or changes one router rule, with the engine's errors beside their fields.

The form does not judge the input: it sends it, and when the engine refuses it (`InvalidInput`
names the field) the error shows under that field and nothing is stored. Enter (in a text field) or
Ctrl+S saves, Esc cancels. It dismisses with the stored rule.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, Select, Static

from backend.errors import EngineUnavailable, InvalidInput, SysvmError
from tui_app.rule_forms import CHOICE, SECRET, YES_NO, RuleForm, form_field_for, to_fields

if TYPE_CHECKING:
    from tui_app.app import SysvmApp

Save = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Stores the fields (add or replace) and returns the stored rule; raises InvalidInput."""


def _row_id(name: str) -> str:
    return "f-" + name.replace(".", "-").replace("_", "-")


class RuleFormScreen(ModalScreen[dict[str, Any] | None]):
    """Add or edit one rule of a network; the engine's verdict is shown field by field."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save", id="rule_form.save"),
        Binding("escape", "cancel", "Cancel", id="rule_form.cancel"),
    ]

    DEFAULT_CSS = """
    RuleFormScreen {
        align: center middle;
        & > #form-dialog {
            width: 76;
            max-width: 100%;
            height: auto;
            max-height: 100%;
            border: round $accent;
            border-title-style: bold;
            background: $surface;
            padding: 0 1;
        }
        & #form-fields { height: auto; max-height: 18; }
        & .form-row { height: 1; }
        & .form-row > Label { width: 19; color: $text-muted; }
        & .form-row > Input, & .form-row > Select { width: 1fr; }
        & .form-error { display: none; color: $error; padding-left: 19; }
        & .form-error.-shown { display: block; }
        & #form-general { display: none; color: $error; }
        & #form-general.-shown { display: block; }
    }
    """

    def __init__(
        self,
        form: RuleForm,
        network: str,
        save: Save,
        *,
        values: dict[str, str] | None = None,
        rule_id: int | None = None,
    ) -> None:
        super().__init__()
        self.form = form
        self.network = network
        self.save = save
        self.values = dict(values or {})
        self.rule_id = rule_id
        self.errors: dict[str, str] = {}  # field -> the engine's reason, as shown
        self.saving = False

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        noun = self.form.noun
        what = f"Edit {noun} {self.rule_id}" if self.rule_id is not None else f"Add {noun}"
        with Vertical(id="form-dialog") as dialog:
            dialog.border_title = f"{what} {'|' if self.sysvm.ascii else '·'} {self.network}"
            with VerticalScroll(id="form-fields"):
                for f in self.form.fields:
                    value = self.values.get(f.name, "")
                    with Horizontal(classes="form-row"):
                        yield Label(f.label)
                        if f.kind in (CHOICE, YES_NO):
                            options = [(c, c) for c in f.choices]
                            yield Select(
                                options,
                                value=value if value in f.choices else Select.NULL,
                                prompt="choose" if f.required else "(default)",
                                compact=True,
                                id=_row_id(f.name),
                            )
                        else:
                            yield Input(
                                value,
                                placeholder=f.hint,
                                password=f.kind == SECRET,
                                compact=True,
                                id=_row_id(f.name),
                            )
                    yield Static("", classes="form-error", id=_row_id(f.name) + "-error")
            yield Static("", id="form-general")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        first = self.query(".form-row > Input, .form-row > Select").first()
        first.focus()

    def typed(self) -> dict[str, str]:
        """What the rows hold now, by field name."""
        out: dict[str, str] = {}
        for f in self.form.fields:
            widget = self.query_one("#" + _row_id(f.name))
            if isinstance(widget, Select):
                value = widget.value
                out[f.name] = "" if value is Select.NULL else str(value)
            elif isinstance(widget, Input):
                out[f.name] = widget.value
        return out

    # -- saving -------------------------------------------------------------------------------

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()

    def action_save(self) -> None:
        if not self.saving:
            self.saving = True
            self._save(to_fields(self.form, self.typed()))

    @work(group="rule-form", exclusive=True, exit_on_error=False)
    async def _save(self, fields: dict[str, Any]) -> None:
        try:
            stored = await self.save(fields)
        except InvalidInput as exc:
            self.show_error(exc.field, exc.reason)
            return
        except EngineUnavailable as exc:
            self.sysvm.report_engine_error(exc)
            self.show_error("", str(exc))
            return
        except SysvmError as exc:
            self.show_error("", str(exc))
            return
        except Exception as exc:  # never a traceback on screen
            self.show_error("", f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.saving = False
        self.dismiss(stored)

    def show_error(self, field: str, reason: str) -> None:
        """Put the engine's reason under the field it names (else above the keys line)."""
        self.clear_errors()
        row = form_field_for(self.form, field) if field else None
        if row is None:
            general = self.query_one("#form-general", Static)
            general.update(f"{field}: {reason}" if field else reason)
            general.add_class("-shown")
            self.errors[field or ""] = reason
            return
        label = self.form.field(row)
        detail = reason if field == row else f"{field}: {reason}"
        self.errors[row] = detail
        error = self.query_one("#" + _row_id(row) + "-error", Static)
        error.update(f"{label.label if label else row}: {detail}")
        error.add_class("-shown")
        widget = self.query_one("#" + _row_id(row))
        widget.focus()
        widget.scroll_visible(animate=False)

    def clear_errors(self) -> None:
        self.errors.clear()
        for shown in self.query(".form-error.-shown, #form-general.-shown"):
            shown.remove_class("-shown")

    def action_cancel(self) -> None:
        self.dismiss(None)
