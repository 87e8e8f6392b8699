"""The router rules screen (`e` on a network or router, `:rules NET`): one tab per rule type.

`a` adds a rule, Enter or `E` edits the one under the cursor (in place: a refused change leaves
the old rule as it was), `d` deletes it after asking, `D` shows what the next apply would change
(desired vs what was last applied and what is live), `A` applies (after asking) and follows the
job: progress, the commit-confirmed window counting down, the result. `c` reads back what is
live and reports drift in words. Read-only mode removes the keys that change anything.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from backend.router.rule_types import RuleType
from tui_app.rule_forms import FORMS, RuleForm, cell, summary, to_values
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.router_diff import RouterDiffScreen
from tui_app.screens.rule_form import RuleFormScreen
from tui_app.widgets.rule_table import RuleTable

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo, StatusTree
    from tui_app.app import SysvmApp

CONFIRM_SECONDS = 30.0
RELOAD_SECONDS = 0.1
MUTATING = frozenset({"add_rule", "edit_rule", "delete_rule", "apply"})
NEEDS_ROW = frozenset({"edit_rule", "delete_rule"})


def _table_id(rule_type: RuleType) -> str:
    return f"rules-{rule_type.value}"


def ascii_words(text: str) -> str:
    return text.replace("—", "-").replace("·", "|").replace("…", "...")


def status_words(shown: dict[str, Any]) -> tuple[str, str]:
    """The router's state in words, and a style: drift first, then pending changes."""
    router = shown.get("router")
    version = int(shown.get("version") or 0)
    if router is None:
        return ("no router yet: the rules are applied when the network's router starts", "yellow")
    state = shown.get("router_state")
    if state not in ("Running", None):
        return (f"router {router} is {state}: A applies once it runs again", "yellow")
    if shown.get("drift"):
        return ("live rules differ from desired (drift) — press A to reapply", "bold red")
    if shown.get("pending") and not version and not shown.get("rules"):
        # Only the network's base config (addresses, egress policy) waits: no rule changed.
        return ("no rules yet — a adds one; A applies the network's base config", "yellow")
    if shown.get("pending"):
        live = f"version {version} live" if version else "nothing applied yet"
        return (f"changes not applied ({live}) — D shows them, A applies", "yellow")
    if version == 0:
        return ("no rules applied yet", "dim")
    return (f"version {version} applied, live matches it", "green")


class RouterRulesScreen(Screen[None]):
    """The rules of one network's router, editable, with diff and commit-confirmed apply."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", show=False, id="rules.back"),
        Binding("a", "add_rule", "Add", id="rules.add"),
        Binding("E", "edit_rule", "Edit", id="rules.edit"),
        Binding("d,delete", "delete_rule", "Delete", id="rules.delete"),
        Binding("D", "diff", "Diff", id="rules.diff"),
        Binding("A", "apply", "Apply", id="rules.apply"),
        Binding("c", "check", "Check", id="rules.check"),
        Binding("right_square_bracket", "next_tab", "Type", key_display="[/]", id="rules.next"),
        Binding(
            "left_square_bracket", "previous_tab", "Previous type", show=False, id="rules.prev"
        ),
    ]

    DEFAULT_CSS = """
    RouterRulesScreen {
        & > #rules-title { height: 1; padding: 0 1; background: $panel; text-style: bold; }
        & > #rules-status { height: auto; padding: 0 1; }
        & > #rules-tabs { height: 1fr; }
        & TabPane { padding: 0; }
        & .rules-empty { display: none; padding: 1 2; color: $text-muted; }
        & .rules-empty.-shown { display: block; }
        & > #rules-activity { display: none; height: auto; max-height: 3; padding: 0 1; }
        & > #rules-activity.-shown { display: block; }
    }
    """

    def __init__(self, network: str) -> None:
        super().__init__()
        self.network = network
        self.shown: dict[str, Any] = {}
        self.loaded = False
        self.listing_help = False
        self.job_id: int | None = None
        self.job: dict[str, Any] = {}
        self.confirm_timeout = CONFIRM_SECONDS
        self._job_started = 0.0
        self._rollback_deadline = 0.0
        self._activity: Text | None = None
        self._reload_armed = False
        self._has_row = False

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(self._say(f"Router rules · {self.network}"), id="rules-title")
        yield Static(self._say("reading the router's rules…"), id="rules-status")
        with TabbedContent(id="rules-tabs"):
            for form in FORMS.values():
                with TabPane(form.tab, id=f"tab-{form.type.value}"):
                    yield RuleTable(id=_table_id(form.type))
                    yield Static("", classes="rules-empty", id=f"empty-{form.type.value}")
        yield Static("", id="rules-activity")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        for form in FORMS.values():
            table = self._table(form.type)
            table.add_column("id", key="id", width=4)
            for header, _names in form.columns:
                table.add_column(header, key=header)
        self._table(self.rule_type).focus()
        self.sysvm.add_engine_listener(self._on_snapshot, self._on_event)
        self.set_interval(1.0, self._countdown_tick)
        self._load()

    def on_unmount(self) -> None:
        self.sysvm.remove_engine_listener(self._on_snapshot, self._on_event)

    # -- data ---------------------------------------------------------------------------------

    @property
    def rules(self) -> list[dict[str, Any]]:
        return list(self.shown.get("rules", []))

    @work(group="rules-load", exclusive=True, exit_on_error=False)
    async def _load(self) -> None:
        try:
            shown = await self.sysvm.api.router_show(self.network)
        except Exception as exc:
            self.sysvm.report_engine_error(exc, f"rules of {self.network}")
            self.query_one("#rules-status", Static).update(
                Text(f"cannot read the rules of {self.network}", style="red")
            )
            return
        first = not self.loaded
        self.shown = shown
        self.loaded = True
        self._show_rules()
        if first and not any(r.get("type") == self.rule_type for r in self.rules):
            # Open on the first kind of rule the router has (the tab row stays in order).
            held = {str(r.get("type")) for r in self.rules}
            found = next((t for t in FORMS if t.value in held), None)
            if found is not None:
                self.call_after_refresh(self.show_type, found)

    def _on_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        if self.loaded:  # after a reconnect
            self._reload_soon()

    def _on_event(self, event: EventRecord) -> None:
        if event.entity == "job" and event.entity_id == self.job_id:
            self._job_event(event)
        elif event.entity in ("router_rule", "network") and event.name == self.network:
            self._reload_soon()
        elif event.entity == "system_vm" and event.name == self.shown.get("router"):
            self._reload_soon()

    def _reload_soon(self) -> None:
        if not self._reload_armed:
            self._reload_armed = True
            self.set_timer(RELOAD_SECONDS, self._reload)

    def _reload(self) -> None:
        self._reload_armed = False
        self._load()

    # -- rendering ----------------------------------------------------------------------------

    def _show_rules(self) -> None:
        shown = self.shown
        router = shown.get("router")
        title = f"Router rules · {self.network}"
        if router:
            title += f" · {router} {shown.get('router_state') or ''}".rstrip()
        if shown.get("public_ip"):
            title += f" · public {shown['public_ip']}"
        self.query_one("#rules-title", Static).update(self._say(title))
        words, style = status_words(shown)
        self.query_one("#rules-status", Static).update(Text(self._say(words), style=style))
        by_type: dict[str, list[dict[str, Any]]] = {}
        for rule in self.rules:
            by_type.setdefault(str(rule.get("type")), []).append(rule)
        tabs = self.query_one("#rules-tabs", TabbedContent)
        counted = {
            f.type: f"{f.tab} {len(by_type[f.type.value])}" if f.type.value in by_type else f.tab
            for f in FORMS.values()
        }
        if sum(len(label) + 2 for label in counted.values()) > (self.size.width or 80):
            counted = {t: FORMS[t].tab for t in counted}  # every tab in view beats the counts
        for form in FORMS.values():
            self._fill(form, by_type.get(form.type.value, []))
            label = counted[form.type]
            tab = tabs.get_tab(f"tab-{form.type.value}")
            if str(tab.label) != label:
                tab.label = label
        self._refresh_row_keys()

    def _fill(self, form: RuleForm, rows: list[dict[str, Any]]) -> None:
        table = self._table(form.type)
        keep = self._selected_id(table)
        table.clear()
        for rule in rows:
            cells = [cell(rule, names) for _header, names in form.columns]
            table.add_row(Text(str(rule["id"]), justify="right"), *cells, key=str(rule["id"]))
        if keep is not None and str(keep) in table.rows:
            table.move_cursor(row=table.get_row_index(str(keep)), animate=False)
        empty = self.query_one(f"#empty-{form.type.value}", Static)
        hint = "" if self.sysvm.read_only else " Press a to add one."
        title = form.title if form.title[:2].isupper() else form.title[:1].lower() + form.title[1:]
        empty.update(f"No {title}.{hint}")
        empty.set_class(not rows, "-shown")
        table.display = bool(rows)

    # -- where the cursor is ------------------------------------------------------------------

    @property
    def rule_type(self) -> RuleType:
        if not self.is_mounted:
            return RuleType.FIREWALL_INGRESS
        active = self.query_one("#rules-tabs", TabbedContent).active
        return RuleType(active.removeprefix("tab-")) if active else RuleType.FIREWALL_INGRESS

    @property
    def form(self) -> RuleForm:
        return FORMS[self.rule_type]

    def _table(self, rule_type: RuleType) -> RuleTable:
        return self.query_one("#" + _table_id(rule_type), RuleTable)

    @staticmethod
    def _selected_id(table: DataTable[Any]) -> int | None:
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    @property
    def selected_rule(self) -> dict[str, Any] | None:
        """The rule under the cursor of the tab on view."""
        if not self.is_mounted:
            return None
        rule_id = self._selected_id(self._table(self.rule_type))
        return next((r for r in self.rules if r.get("id") == rule_id), None)

    @on(TabbedContent.TabActivated)
    def _tab_changed(self) -> None:
        table = self._table(self.rule_type)
        if table.display:
            table.focus()
        self._refresh_row_keys()

    @on(DataTable.RowHighlighted)
    def _moved(self) -> None:
        self._refresh_row_keys()

    def _refresh_row_keys(self) -> None:
        has_row = self.selected_rule is not None
        if has_row != self._has_row:
            self._has_row = has_row
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MUTATING and self.sysvm.read_only:
            return False
        if action in NEEDS_ROW:
            return self.sysvm.gate(self, action, self.selected_rule is not None)
        return True

    def action_next_tab(self) -> None:
        self._step_tab(1)

    def action_previous_tab(self) -> None:
        self._step_tab(-1)

    def _step_tab(self, step: int) -> None:
        types = list(FORMS)
        index = (types.index(self.rule_type) + step) % len(types)
        self.query_one("#rules-tabs", TabbedContent).active = f"tab-{types[index].value}"

    def show_type(self, rule_type: RuleType) -> None:
        self.query_one("#rules-tabs", TabbedContent).active = f"tab-{rule_type.value}"

    # -- add, edit, delete --------------------------------------------------------------------

    def action_add_rule(self) -> None:
        form = self.form
        values = {}
        public_ip = self.shown.get("public_ip")
        if public_ip and form.field("public_ip") is not None:
            values["public_ip"] = str(public_ip)
        network, api = self.network, self.sysvm.api

        async def save(fields: dict[str, Any]) -> dict[str, Any]:
            return await api.router_rule_add(network, form.type.value, fields)

        self.app.push_screen(RuleFormScreen(form, network, save, values=values), self._stored)

    @on(DataTable.RowSelected)
    def _row_opened(self) -> None:
        if self.check_action("edit_rule", ()):
            self.action_edit_rule()

    def action_edit_rule(self) -> None:
        rule = self.selected_rule
        if rule is None:
            return
        form = FORMS[RuleType(rule["type"])]
        rule_id = int(rule["id"])
        network, api = self.network, self.sysvm.api

        async def save(fields: dict[str, Any]) -> dict[str, Any]:
            return await api.router_rule_replace(network, rule_id, form.type.value, fields)

        screen = RuleFormScreen(form, network, save, values=to_values(form, rule), rule_id=rule_id)
        self.app.push_screen(screen, self._stored)

    def _stored(self, rule: dict[str, Any] | None) -> None:
        if rule is None:
            return
        self.app.notify(
            self._say(f"{summary(rule)} — stored; A applies it"),
            title=self.network,
            timeout=4,
        )
        self._load()

    def action_delete_rule(self) -> None:
        rule = self.selected_rule
        if rule is None:
            return
        rule_id = int(rule["id"])

        def answered(yes: bool | None) -> None:
            if yes:
                self._delete(rule_id)

        self.app.push_screen(
            ConfirmScreen(
                f"Delete {summary(rule)}?",
                f"It leaves {self.network}'s router at the next apply (A).",
                verb="Delete",
            ),
            answered,
        )

    @work(group="rules-delete", exit_on_error=False)
    async def _delete(self, rule_id: int) -> None:
        try:
            await self.sysvm.api.router_rule_delete(self.network, rule_id)
        except Exception as exc:
            self.sysvm.report_engine_error(exc, f"delete rule {rule_id}")
            return
        self.app.notify(f"rule {rule_id} deleted; A applies it", title=self.network, timeout=4)
        self._load()

    # -- diff, apply, check -------------------------------------------------------------------

    def action_diff(self) -> None:
        self.app.push_screen(RouterDiffScreen(self.network, self.shown))

    def action_apply(self) -> None:
        if self.job_id is not None and self.job.get("state") in ("queued", "running"):
            self.app.notify("an apply is already running", title=self.network, timeout=4)
            return
        shown = self.shown
        router = shown.get("router") or "the router"
        version = int(shown.get("version") or 0)
        what = "Apply the rules" if shown.get("pending") else "Reapply the rules"
        question = f"{what} of {self.network} to {router} as version {version + 1}?"
        detail = (
            f"Commit-confirmed: unless the engine confirms within {self.confirm_timeout:.0f} s "
            f"over a new connection, {router} rolls back to version {version} by itself."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self._apply()

        self.app.push_screen(ConfirmScreen(question, detail, verb="Apply"), answered)

    @work(group="rules-apply", exit_on_error=False)
    async def _apply(self) -> None:
        try:
            job = await self.sysvm.api.router_apply(
                self.network, confirm_timeout=self.confirm_timeout
            )
        except Exception as exc:
            self.sysvm.report_engine_error(exc, f"apply {self.network}")
            return
        self.job_id = job.id
        self.job = {"state": job.state, "progress": job.progress, "message": job.message}
        self._job_started = time.monotonic()
        self._rollback_deadline = 0.0
        if self.sysvm.main_screen.is_mounted:
            self.sysvm.main_screen.strip.add_job(job)
        self._show_job()
        if job.finished:
            await self._job_finished()

    def _job_event(self, event: EventRecord) -> None:
        f = event.fields
        self.job.update(
            state=f.get("state", self.job.get("state")),
            progress=float(f.get("progress") or 0.0),
            message=f.get("message", ""),
            error=f.get("error", ""),
        )
        self._show_job()
        if self.job.get("state") in ("succeeded", "failed", "cancelled"):
            self.run_worker(self._job_finished(), group="rules-apply-end", exit_on_error=False)

    async def _job_finished(self) -> None:
        """Read the job's result (or error) once, then the router's state."""
        if self.job_id is None:
            return
        try:
            job = await self.sysvm.api.job(self.job_id)
        except Exception as exc:
            self.sysvm.report_engine_error(exc)
            return
        self.job.update(state=job.state, error=job.error, result=job.result or {})
        if job.state == "failed" and "rolls back" in job.error:
            self._rollback_deadline = self._job_started + self.confirm_timeout
        self._show_job()
        self._load()

    def _show_job(self) -> None:
        job = self.job
        state = str(job.get("state", ""))
        jid = self.job_id
        line = Text()
        if state in ("queued", "running"):
            left = max(0, self.confirm_timeout - (time.monotonic() - self._job_started))
            line.append(f"apply (job {jid}) {float(job.get('progress') or 0):.0f}% ", "bold yellow")
            line.append(str(job.get("message") or state))
            line.append(
                f"\nconfirm window: {left:.0f} s left before the router would roll back by itself",
                "dim",
            )
        elif state == "succeeded":
            result = job.get("result") or {}
            line.append(
                str(job.get("message") or f"version {result.get('version')} applied"), "green"
            )
            services = result.get("services") or {}
            reloaded = [name for name, what in services.items() if what == "reloaded"]
            if reloaded:
                line.append(f"; reloaded {', '.join(sorted(reloaded))}", "dim")
        elif state == "failed":
            line.append(f"apply failed: {job.get('error') or 'see the job'}", "red")
            if self._rollback_deadline:
                left = self._rollback_deadline - time.monotonic()
                line.append(
                    f"\nrolling back by itself in {left:.0f} s"
                    if left > 0
                    else self._say("\nthe router has rolled back — press c to check what is live"),
                    "bold red",
                )
        elif state == "cancelled":
            line.append("apply cancelled", "dim")
        self._activity = line
        activity = self.query_one("#rules-activity", Static)
        activity.update(line)
        activity.set_class(bool(line.plain), "-shown")

    def _countdown_tick(self) -> None:
        """Once a second: the confirm window and rollback countdowns move."""
        running = self.job.get("state") in ("queued", "running")
        if running or (self._rollback_deadline and self.job.get("state") == "failed"):
            self._show_job()

    def action_check(self) -> None:
        status = self.query_one("#rules-status", Static)
        status.update(Text(self._say("reading back what is live…"), "dim"))
        self._check()

    @work(group="rules-check", exclusive=True, exit_on_error=False)
    async def _check(self) -> None:
        try:
            checked = await self.sysvm.api.router_check(self.network)
        except Exception as exc:
            self.sysvm.report_engine_error(exc, f"check {self.network}")
            self._load()
            return
        live, applied = checked.get("live_version"), checked.get("version")
        if checked.get("drift"):
            if live != applied:
                words = (
                    f"{checked['router']} runs version {live}, not the applied {applied} "
                    "(it rolled back) — press A to reapply"
                )
            else:
                words = "live rules differ from desired (drift) — press A to reapply"
            self.app.notify(
                self._say(words), title=f"check {self.network}", severity="warning", timeout=8
            )
        else:
            self.app.notify(
                f"{checked['router']}: version {live} live, no drift",
                title=f"check {self.network}",
                timeout=4,
            )
        self._load()

    def action_back(self) -> None:
        self.app.pop_screen()

    def _say(self, text: str) -> str:
        """Text for the screen: in ASCII mode without dashes, dots and ellipses it lacks."""
        return ascii_words(text) if self.sysvm.ascii else text
