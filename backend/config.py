"""Settings of one installation and where each value came from (default, file, env or flag).

Precedence, lowest to highest: default < config file < environment (`SYSVM_*`) < CLI flag.
Nothing here creates files or directories; the only I/O is reading the config file.
"""

from __future__ import annotations

import builtins
import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import platformdirs

from backend.errors import ConfigError

APP_NAME = "sysvm"
HOME_ENV = "SYSVM_HOME"
ENV_PREFIX = "SYSVM_"
CONFIG_FILE_NAME = "config.toml"
KEYS_TABLE = "keys"
"""The config file's table remapping console keys: `[keys]` then `"object.destroy" = "X"`."""
KEY_NAMES = re.compile(r"[A-Za-z0-9_+\-]+(,[A-Za-z0-9_+\-]+)*")
"""Textual key names, comma separated: `X`, `ctrl+x`, `f2`, `semicolon`, `j,down`."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Setting:
    """One known setting: its dotted key, value type, default and constraints."""

    key: str
    type: builtins.type  # bool, int, float or str
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a regular expression the whole (string) value must match


_ALL_SETTINGS = (
    Setting("read_only", bool, False, "refuse every mutating request"),
    Setting("ascii", bool, False, "ASCII instead of box drawing and icons"),
    Setting(
        "theme",
        str,
        "ansi",
        "console colours: ansi (the terminal's palette) or a Textual theme, e.g. nord",
        pattern=r"[a-z0-9-]{1,40}",
    ),
    Setting(
        "log.level",
        str,
        "INFO",
        "least severe level written to the log",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    Setting(
        "engine.start_timeout",
        float,
        20.0,
        "seconds a client waits for an engine it started",
        minimum=0.1,
    ),
    Setting(
        "engine.connect_timeout",
        float,
        5.0,
        "seconds a client waits to connect to a running engine",
        minimum=0.1,
    ),
    Setting("lab.zones", int, 2, "zones in the lab", minimum=1),
    Setting("lab.hosts", int, 2, "hosts per zone in the lab", minimum=1),
    Setting("lab.networks", int, 2, "guest networks per zone in the lab", minimum=0),
    Setting("lab.vms", int, 3, "guest VMs per network in the lab", minimum=0),
    Setting(
        "lab.boot_delay",
        float,
        0.0,
        "seconds a lab system VM takes to boot before its SSH endpoint answers",
        minimum=0,
    ),
    Setting(
        "network.gc.wait",
        int,
        600,
        "seconds a network without running VMs waits before its router is stopped",
        minimum=0,
    ),
    Setting("cpvm.capacity", int, 50, "console sessions one console proxy VM serves", minimum=1),
    Setting(
        "cpvm.standby",
        int,
        10,
        "free console sessions kept in reserve; fewer starts another console proxy VM",
        minimum=0,
    ),
    Setting(
        "instance.name",
        str,
        "VM",
        "suffix of system VM names (s-1-VM), as CloudStack's instance.name",
        pattern=r"[A-Za-z0-9]{1,16}",
    ),
    Setting(
        "ssvm.capacity",
        int,
        10,
        "concurrent template transfers one secondary storage VM serves before another starts",
        minimum=1,
    ),
    Setting(
        "systemvm.scale_down_after",
        float,
        600.0,
        "seconds a zone must have more system VMs than its load needs before extras go",
        minimum=0,
    ),
    Setting(
        "systemvm.stop_timeout",
        float,
        30.0,
        "seconds a graceful shutdown may take before the VM is powered off",
        minimum=0,
    ),
    Setting(
        "reconcile.interval",
        float,
        10.0,
        "seconds between two safety scans of every zone (events trigger scans sooner)",
        minimum=0.1,
    ),
    Setting(
        "host.ping_interval",
        float,
        1.0,
        "seconds between two health checks of each host's libvirt connection",
        minimum=0.1,
    ),
    Setting(
        "host.ping_timeout",
        float,
        3.0,
        "seconds a host may take to answer before it goes Alert",
        minimum=0.1,
    ),
    Setting(
        "job.progress_interval",
        float,
        0.5,
        "seconds between two progress events of one job",
        minimum=0,
    ),
)

SETTINGS: dict[str, Setting] = {s.key: s for s in _ALL_SETTINGS}


@dataclass
class Config:
    """Resolved settings of one installation, with the source of each value."""

    home: Path
    values: dict[str, Any]
    sources: dict[str, str]
    file: Path | None = None  # the config file that was read, if any
    keys: dict[str, str] = field(default_factory=dict)
    """The console's key bindings remapped by the file's `[keys]` table: binding id -> keys."""

    def get(self, key: str) -> Any:
        """The value of a known setting; an unknown key raises ConfigError."""
        if key not in self.values:
            raise ConfigError(f"unknown setting '{key}' ({_known_hint(key)})")
        return self.values[key]

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def describe(self) -> list[dict[str, Any]]:
        """One row per setting, sorted by key: key, value, source and help (for `config show`)."""
        return [
            {
                "key": key,
                "value": self.values[key],
                "source": self.sources[key],
                "help": SETTINGS[key].help if key in SETTINGS else "",
            }
            for key in sorted(self.values)
        ] + [
            {
                "key": f"{KEYS_TABLE}.{binding}",
                "value": keys,
                "source": f"file:{self.file}",
                "help": "key binding (see ? in the console)",
            }
            for binding, keys in sorted(self.keys.items())
        ]


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """The installation's home: `SYSVM_HOME` if set, else the user data dir. Creates nothing."""
    env = os.environ if env is None else env
    value = env.get(HOME_ENV, "")
    if value:
        return Path(value).expanduser().absolute()
    return Path(platformdirs.user_data_dir(APP_NAME))


def env_var(key: str) -> str:
    """The environment variable that sets `key`, e.g. `lab.boot_delay` -> `SYSVM_LAB_BOOT_DELAY`."""
    return ENV_PREFIX + key.upper().replace(".", "_")


def config_file_path(home: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The config file to read: home's if it exists, else the user config dir's if it exists.

    When neither exists this is home's path, the place to create one.
    """
    home = home_dir(env) if home is None else home
    in_home = home / CONFIG_FILE_NAME
    if in_home.exists():
        return in_home
    in_user_dir = Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_FILE_NAME
    if in_user_dir.exists():
        return in_user_dir
    return in_home


def load_config(
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[Any, str]] | None = None,
) -> Config:
    """Resolve every setting from defaults, the config file, `SYSVM_*` variables and flags.

    `flags` maps a key to (value, flag name); a value of None means the flag was not given.
    """
    env = os.environ if env is None else env
    home = home_dir(env) if home is None else home
    values: dict[str, Any] = {key: s.default for key, s in SETTINGS.items()}
    sources: dict[str, str] = {key: "default" for key in SETTINGS}

    path = config_file_path(home, env)
    read_from: Path | None = None
    keys: dict[str, str] = {}
    if path.exists():
        read_from = path.absolute()
        settings, keys = _read_file(read_from)
        for key, value in settings.items():
            values[key] = value
            sources[key] = f"file:{read_from}"

    for key, setting in SETTINGS.items():
        name = env_var(key)
        raw = env.get(name, "")
        if raw:  # an empty variable counts as unset, as in `SYSVM_READ_ONLY= sysvm ...`
            values[key] = _coerce_text(setting, raw, name, f"fix or unset {name}")
            sources[key] = f"env:{name}"

    for key, (value, flag) in (flags or {}).items():
        if value is None:
            continue
        if key not in SETTINGS:
            raise ConfigError(f"{flag}: unknown setting '{key}' ({_known_hint(key)})")
        todo = f"fix {flag}"
        if isinstance(value, str):
            values[key] = _coerce_text(SETTINGS[key], value, flag, todo)
        else:
            values[key] = _coerce_typed(SETTINGS[key], value, flag, todo)
        sources[key] = f"flag:{flag}"

    return Config(home=home, values=values, sources=sources, file=read_from, keys=keys)


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and validate the TOML config file into ({dotted key: value}, {binding id: keys})."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc}); fix or remove it") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}; fix the syntax there") from exc
    keys = _keys_table(document.pop(KEYS_TABLE, {}), path)
    found: dict[str, Any] = {}
    _flatten(document, "", path, found)
    return found, keys


def _keys_table(table: Any, path: Path, prefix: str = "") -> dict[str, str]:
    """Check `[keys]`: binding ids mapped to Textual key names (the console reports unknown ids).

    `object.destroy = "X"` (a TOML dotted key) and `"object.destroy" = "X"` mean the same.
    """
    if not isinstance(table, dict):
        raise ConfigError(
            f'{path}: \'{KEYS_TABLE}\' must be a table ([keys] then "object.destroy" = "X"); '
            "fix or delete it"
        )
    keys: dict[str, str] = {}
    for name, value in table.items():
        binding = prefix + name
        if isinstance(value, dict):
            keys.update(_keys_table(value, path, binding + "."))
        elif isinstance(value, str) and KEY_NAMES.fullmatch(value):
            keys[binding] = value
        else:
            raise ConfigError(
                f"{path}: {KEYS_TABLE}.{binding} = {_show(value)} is not a key name; "
                'expected e.g. "X", "ctrl+x", "f2" or "j,down"'
            )
    return keys


def _flatten(table: Mapping[str, Any], prefix: str, path: Path, found: dict[str, Any]) -> None:
    """Walk TOML tables, turning `[network.gc] wait = 10` into `network.gc.wait`, validating values."""
    for name, value in table.items():
        key = prefix + name
        if key in SETTINGS:
            todo = f"fix it or delete it to use the default ({_show(SETTINGS[key].default)})"
            found[key] = _coerce_typed(SETTINGS[key], value, str(path), todo)
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in SETTINGS):
            _flatten(value, key + ".", path, found)
        else:
            raise ConfigError(
                f"{path}: unknown setting '{key}' ({_known_hint(key)}); fix or delete it"
            )


def _coerce_typed(setting: Setting, value: Any, where: str, todo: str) -> Any:
    """Check a value that already has a type (from TOML or a typed flag) against `setting`."""
    kind = setting.type
    ok: bool
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        _fail(setting, where, f"must be {_expected(kind)}, got {_show(value)}", todo)
    return _check_limits(setting, value, where, todo)


def _coerce_text(setting: Setting, text: str, where: str, todo: str) -> Any:
    """Parse an environment variable or flag string into the setting's type and check it."""
    kind = setting.type
    word = text.strip()
    value: Any
    try:
        if kind is bool:
            lowered = word.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(word)
            value = lowered in _TRUE
        elif kind is int:
            value = int(word)
        elif kind is float:
            value = float(word)
            if not math.isfinite(value):
                raise ValueError(word)
        else:
            value = text
    except ValueError:
        expected = "1/0, true/false, yes/no or on/off" if kind is bool else _expected(kind)
        _fail(setting, where, f"must be {expected}, got {text!r}", todo)
    return _check_limits(setting, value, where, todo)


def _check_limits(setting: Setting, value: Any, where: str, todo: str) -> Any:
    """Enforce the minimum and the choices; choices match case-insensitively."""
    if setting.minimum is not None and value < setting.minimum:
        _fail(setting, where, f"must be at least {setting.minimum:g}, got {_show(value)}", todo)
    if setting.choices is not None:
        for choice in setting.choices:
            if choice.lower() == str(value).lower():
                return choice
        options = ", ".join(setting.choices)
        _fail(setting, where, f"must be one of {options}, got {_show(value)}", todo)
    if setting.pattern is not None and not re.fullmatch(setting.pattern, str(value)):
        _fail(setting, where, f"must match {setting.pattern}, got {_show(value)}", todo)
    return value


def _fail(setting: Setting, where: str, why: str, todo: str) -> NoReturn:
    raise ConfigError(f"{where}: {setting.key} {why}; {todo}")


def _expected(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a string")


def _show(value: Any) -> str:
    """A value as an operator wrote it: TOML spelling for booleans, 'quotes' for strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _known_hint(key: str) -> str:
    """Close matches for a misspelt key, or every known key when nothing is close."""
    close = difflib.get_close_matches(key, list(SETTINGS), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{k}'" for k in close) + "?"
    return "known: " + ", ".join(sorted(SETTINGS))
