"""`sysvm tui` settings checked before the console starts: theme, keys, and its log file."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.filter import Monochrome, NoColor

from backend.api.connect import socket_path
from backend.errors import ConfigError
from tui_app.app import SysvmApp
from tui_app.themes import ANSI_THEME, console_theme, theme_names

from .conftest import run_cli


def test_a_bad_theme_is_refused_before_any_engine_starts(home: Path) -> None:
    done = run_cli("tui", "--theme", "nrod")
    assert done.returncode == 1
    assert "theme: 'nrod' (from flag:--theme) is not a theme; did you mean 'nord'?" in done.stderr
    assert not socket_path(home).exists(), "the console started an engine it could not show"


def test_a_bad_key_name_in_config_is_refused_naming_the_binding(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('[keys]\n"object.destroy" = "ctrl+d; reboot"\n')
    done = run_cli("tui")
    assert done.returncode == 1
    assert "keys.object.destroy = 'ctrl+d; reboot' is not a key name" in done.stderr
    assert not socket_path(home).exists()


def test_theme_names_resolve_and_ansi_means_the_terminal_palette() -> None:
    assert console_theme("ansi") == ANSI_THEME
    assert console_theme("nord") == "nord"
    assert theme_names()[0] == "ansi" and "textual-dark" in theme_names()
    with pytest.raises(ConfigError, match="from env:SYSVM_THEME"):
        console_theme("Nord", "env:SYSVM_THEME")


def test_the_ansi_theme_draws_with_the_terminals_own_colours(engine: object) -> None:
    app = SysvmApp(engine, theme=console_theme("ansi"))  # type: ignore[arg-type]
    assert app.current_theme.name == ANSI_THEME
    assert app.native_ansi_color, "ANSI colours would be converted to fixed RGB values"


def test_no_color_turns_colour_off(engine: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = SysvmApp(engine, theme=console_theme("ansi"))  # type: ignore[arg-type]
    assert app.no_color
    assert any(isinstance(f, NoColor | Monochrome) for f in app._filters)
    monkeypatch.delenv("NO_COLOR")
    plain = SysvmApp(engine)  # type: ignore[arg-type]
    assert not any(isinstance(f, NoColor | Monochrome) for f in plain._filters)


def test_console_logs_go_to_tui_log_never_the_terminal(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from backend.cli import _prepare_console
    from backend.config import load_config

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        _prepare_console(load_config(home=home))
        logging.getLogger("tui_app.engine_link").warning("engine gone: %s", "socket closed")
        for handler in root.handlers:
            handler.flush()
        assert (
            "WARNING tui_app.engine_link: engine gone: socket closed"
            in (home / "tui.log").read_text()
        )
        assert all(isinstance(h, logging.FileHandler) for h in root.handlers)
        out, err = capsys.readouterr()
        assert "engine gone" not in out + err
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]
