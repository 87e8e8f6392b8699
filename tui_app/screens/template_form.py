"""Forms that start a template transfer: register from a URL (`r`), upload a local file (`u`).

The engine validates; a refusal is shown under the field it names (url, checksum, name,
format, zone, file) and the form stays open with what was typed. On success the form closes
with ("register template NAME", job).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Input, Label, Select, Static

from backend.errors import Conflict, EngineUnavailable, InvalidInput, NotFound, SysvmError

if TYPE_CHECKING:
    from backend.api.protocol import EngineAPI
    from backend.api.types import JobInfo
    from tui_app.app import SysvmApp

FORMATS = ("QCOW2", "RAW", "ISO")
EXTENSIONS = {".qcow2": "QCOW2", ".qcow": "QCOW2", ".raw": "RAW", ".img": "RAW", ".iso": "ISO"}
FormResult = tuple[str, "JobInfo"]


@dataclass(frozen=True)
class FormField:
    """One line of a form: the engine's name for the field, its label, and a hint."""

    key: str
    label: str
    placeholder: str = ""
    required: bool = True


def format_of(location: str) -> str | None:
    """The format a file name suggests ("x.qcow2" -> "QCOW2"), if any."""
    path = location.split("?", 1)[0].lower()
    return next((f for ext, f in EXTENSIONS.items() if path.endswith(ext)), None)


def name_of(location: str) -> str:
    """A template name from a file name: "/isos/Debian 12.iso" -> "Debian-12"."""
    stem = Path(location.split("?", 1)[0].rstrip("/")).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return name[:64]


class TemplateFormScreen(ModalScreen["FormResult | None"]):
    """A few labelled inputs, a format choice, a line per field for the engine's errors."""

    SCOPED_CSS = False  # so the `.-ascii` rule (a class of the app) reaches it

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="template_form.cancel"),
        Binding("enter", "submit", "Submit", id="template_form.submit"),
    ]

    DEFAULT_CSS = """
    TemplateFormScreen {
        align: center middle;
        & > #form-dialog {
            width: 76;
            max-width: 98%;
            height: auto;
            padding: 0 1;
            border: round $accent;
            border-title-style: bold;
            background: $surface;
        }
        & .form-row { height: 1; margin-top: 1; }
        & .form-label { width: 10; }
        & .form-row > Input, & .form-row > Select { width: 1fr; }
        & .form-error { display: none; color: $error; padding-left: 10; }
        & .form-error.-shown { display: block; }
        & #form-problem { display: none; color: $error; margin-top: 1; }
        & #form-problem.-shown { display: block; }
        & #form-keys { color: $text-muted; margin-top: 1; }
    }
    .-ascii TemplateFormScreen > #form-dialog { border: ascii $accent; }
    """

    TITLE_WORDS = ""
    FIELDS: ClassVar[tuple[FormField, ...]] = ()
    LOCATION = ""
    """The field whose file name suggests the format (and, for uploads, the name)."""

    def __init__(self, zones: list[str], zone: str = "") -> None:
        super().__init__()
        self.zones = zones
        self.zone = zone
        self.busy = False
        self._inferred_format = FORMATS[0]
        self._inferred_name = ""

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Vertical(id="form-dialog") as dialog:
            dialog.border_title = self.TITLE_WORDS
            for field in self.FIELDS:
                with Horizontal(classes="form-row"):
                    yield Label(field.label, classes="form-label")
                    yield self._input(field)
                yield Static(id=f"error-{field.key}", classes="form-error")
            yield Static(id="form-problem")
            yield Static("Enter: submit   Tab: next field   Esc: cancel", id="form-keys")

    def _input(self, field: FormField) -> Input | Select[str]:
        if field.key == "format":
            return Select(
                [(f, f) for f in FORMATS],
                value=FORMATS[0],
                allow_blank=False,
                compact=True,
                id="field-format",
            )
        value = self.zone if field.key == "zone" else ""
        suggester = (
            SuggestFromList(self.zones, case_sensitive=False) if field.key == "zone" else None
        )
        return Input(
            value=value,
            placeholder=field.placeholder,
            compact=True,
            suggester=suggester,
            id=f"field-{field.key}",
        )

    def on_mount(self) -> None:
        first = next((f for f in self.FIELDS if not self._value(f.key)), self.FIELDS[0])
        self.query_one(f"#field-{first.key}").focus()
        if self.sysvm.ascii:  # the format choice's arrows, which Textual draws as triangles
            for arrow, text in ((".down-arrow", "v"), (".up-arrow", "^")):
                for glyph in self.query(f"#field-format {arrow}"):
                    assert isinstance(glyph, Static)
                    glyph.update(text)

    def _value(self, key: str) -> str:
        widget = self.query_one(f"#field-{key}")
        if isinstance(widget, Select):
            return str(widget.value) if widget.value is not Select.BLANK else ""
        assert isinstance(widget, Input)
        return widget.value.strip()

    # -- helping the user ---------------------------------------------------------------------

    @on(Input.Changed)
    def _typed(self, event: Input.Changed) -> None:
        key = (event.input.id or "").removeprefix("field-")
        self._show_error(key, "")
        if key != self.LOCATION:
            return
        fmt = format_of(event.value)
        select = self.query_one("#field-format", Select)
        if fmt is not None and select.value == self._inferred_format:
            select.value = self._inferred_format = fmt
        if self.query("#field-name") and key == "file":
            name_input = self.query_one("#field-name", Input)
            if name_input.value == self._inferred_name:
                name_input.value = self._inferred_name = name_of(event.value)

    @on(Select.Changed)
    def _chosen(self) -> None:
        self._show_error("format", "")

    def _show_error(self, key: str, message: str) -> None:
        for box in self.query(f"#error-{key}"):
            assert isinstance(box, Static)
            box.update(message)
            box.set_class(bool(message), "-shown")

    def _problem(self, message: str) -> None:
        box = self.query_one("#form-problem", Static)
        box.update(message)
        box.set_class(bool(message), "-shown")

    # -- submitting ---------------------------------------------------------------------------

    @on(Input.Submitted)
    def _entered(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def action_submit(self) -> None:
        if self.busy:
            return
        values = {f.key: self._value(f.key) for f in self.FIELDS}
        missing = [f for f in self.FIELDS if f.required and not values[f.key]]
        for field in self.FIELDS:
            self._show_error(field.key, "")
        self._problem("")
        if missing:
            for field in missing:
                self._show_error(field.key, f"{field.key}: required")
            self.query_one(f"#field-{missing[0].key}").focus()
            return
        self.busy = True
        self._send(values)

    @work(group="template-form", exclusive=True, exit_on_error=False)
    async def _send(self, values: dict[str, str]) -> None:
        try:
            job = await self.request(self.sysvm.api, values)
        except Exception as exc:
            self.busy = False
            self._refused(exc)
            return
        self.dismiss((self.words(values), job))

    def _refused(self, exc: BaseException) -> None:
        """Put the engine's reason under the field it names, or below the form."""
        key = ""
        if isinstance(exc, InvalidInput):
            key = exc.field
        elif isinstance(exc, NotFound) and "zone" in str(exc):
            key = "zone"
        elif isinstance(exc, Conflict) and "template named" in str(exc):
            key = "name"
        message = str(exc)
        if key in {f.key for f in self.FIELDS}:
            if not message.startswith(f"{key}:"):
                message = f"{key}: {message}"
            self._show_error(key, message)
            self.query_one(f"#field-{key}").focus()
        elif isinstance(exc, SysvmError | EngineUnavailable):
            self._problem(message)
        else:
            self._problem(f"{type(exc).__name__}: {exc}")

    def action_cancel(self) -> None:
        self.dismiss(None)

    # -- what a form asks for -----------------------------------------------------------------

    async def request(self, api: EngineAPI, values: dict[str, str]) -> JobInfo:
        raise NotImplementedError

    def words(self, values: dict[str, str]) -> str:
        raise NotImplementedError


# The fields both forms ask for.
ZONE = FormField("zone", "Zone", "zone1")
NAME = FormField("name", "Name", "letters, digits, . _ -")
FORMAT_CHECKSUM = (
    FormField("format", "Format"),
    FormField("checksum", "Checksum", "optional: {SHA-256}hex or MD5 hex", required=False),
)


class RegisterTemplateScreen(TemplateFormScreen):
    """`r`: zone, name, URL, format, optional checksum."""

    TITLE_WORDS = "Register a template from a URL"
    FIELDS = (
        ZONE,
        NAME,
        FormField("url", "URL", "http(s)://host/path/image.qcow2"),
        *FORMAT_CHECKSUM,
    )
    LOCATION = "url"

    async def request(self, api: EngineAPI, values: dict[str, str]) -> JobInfo:
        return await api.template_register(
            values["zone"],
            values["name"],
            values["url"],
            values["format"],
            values["checksum"] or None,
        )

    def words(self, values: dict[str, str]) -> str:
        return f"register template {values['name']}"


class UploadTemplateScreen(TemplateFormScreen):
    """`u`: a file the engine's machine can read, zone, name, format, optional checksum."""

    TITLE_WORDS = "Upload a template file"
    FIELDS = (
        FormField("file", "File", "path on the engine's machine"),
        ZONE,
        NAME,
        *FORMAT_CHECKSUM,
    )
    LOCATION = "file"

    async def request(self, api: EngineAPI, values: dict[str, str]) -> JobInfo:
        path = str(Path(values["file"]).expanduser().resolve())
        return await api.template_upload(
            values["zone"], values["name"], path, values["format"], values["checksum"] or None
        )

    def words(self, values: dict[str, str]) -> str:
        return f"upload template {values['name']}"
