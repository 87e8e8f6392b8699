"""Settings resolve default < config file < environment < flag, and say where each came from."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from backend.config import (
    SETTINGS,
    Config,
    config_file_path,
    env_var,
    home_dir,
    load_config,
)
from backend.errors import ConfigError


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the per-user config and data dirs into tmp_path so the real ones never leak in."""
    user = tmp_path / "user"
    monkeypatch.setattr(platformdirs, "user_config_dir", lambda *a, **k: str(user / "config"))
    monkeypatch.setattr(platformdirs, "user_data_dir", lambda *a, **k: str(user / "data"))
    return user


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def write_config(home: Path, text: str) -> Path:
    path = home / "config.toml"
    path.write_text(text)
    return path


def test_every_default_is_valid_and_reported_as_default(home: Path) -> None:
    config = load_config(home, env={})
    assert config.home == home
    assert config.file is None
    for key, setting in SETTINGS.items():
        assert config[key] == setting.default
        assert type(config[key]) is setting.type
        assert config.sources[key] == "default"
    assert config["lab.zones"] == 2
    assert config["read_only"] is False
    assert config["engine.start_timeout"] == 20.0


def test_required_settings_are_registered_with_their_constraints() -> None:
    expected = {
        "read_only": (bool, False),
        "ascii": (bool, False),
        "theme": (str, "ansi"),
        "log.level": (str, "INFO"),
        "engine.start_timeout": (float, 20.0),
        "engine.connect_timeout": (float, 5.0),
        "lab.zones": (int, 2),
        "lab.hosts": (int, 2),
        "lab.networks": (int, 2),
        "lab.vms": (int, 3),
        "lab.boot_delay": (float, 0.0),
        "network.gc.wait": (int, 600),
        "cpvm.capacity": (int, 50),
        "cpvm.standby": (int, 10),
        "job.progress_interval": (float, 0.5),
    }
    for key, (kind, default) in expected.items():
        assert (SETTINGS[key].type, SETTINGS[key].default) == (kind, default), key
        assert SETTINGS[key].help
    assert SETTINGS["log.level"].choices == ("DEBUG", "INFO", "WARNING", "ERROR")
    assert SETTINGS["lab.zones"].minimum == 1
    assert SETTINGS["engine.start_timeout"].minimum == 0.1


def test_file_overrides_default_and_names_the_file(home: Path) -> None:
    path = write_config(
        home,
        'read_only = true\ntheme = "dark"\n[lab]\nzones = 3\nboot_delay = 1\n'
        "[network.gc]\nwait = 10\n",
    )
    config = load_config(home, env={})
    assert config.file == path
    assert config["read_only"] is True
    assert config["lab.zones"] == 3
    assert config["network.gc.wait"] == 10
    assert config["lab.boot_delay"] == 1.0 and isinstance(config["lab.boot_delay"], float)
    assert config.sources["lab.zones"] == f"file:{path}"
    assert config.sources["network.gc.wait"] == f"file:{path}"
    assert config.sources["lab.hosts"] == "default"


def test_toml_dotted_keys_are_the_same_as_tables(home: Path) -> None:
    write_config(home, "lab.zones = 4\nnetwork.gc.wait = 5\n")
    config = load_config(home, env={})
    assert (config["lab.zones"], config["network.gc.wait"]) == (4, 5)


def test_user_config_dir_is_used_when_home_has_no_config_file(
    home: Path, isolated_user_dirs: Path
) -> None:
    user_file = isolated_user_dirs / "config" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[lab]\nvms = 7\n")
    assert config_file_path(home, {}) == user_file
    config = load_config(home, env={})
    assert config["lab.vms"] == 7
    assert config.sources["lab.vms"] == f"file:{user_file}"


def test_home_config_file_wins_over_user_config_dir(home: Path, isolated_user_dirs: Path) -> None:
    user_file = isolated_user_dirs / "config" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[lab]\nvms = 7\n")
    home_file = write_config(home, "[lab]\nvms = 1\n")
    assert config_file_path(home, {}) == home_file
    assert load_config(home, env={})["lab.vms"] == 1


def test_config_file_path_is_in_home_when_no_file_exists(home: Path) -> None:
    assert config_file_path(home, {}) == home / "config.toml"
    assert not (home / "config.toml").exists()


def test_env_overrides_file_and_names_its_variable(home: Path) -> None:
    write_config(home, "[lab]\nzones = 3\nboot_delay = 2.5\n")
    env = {"SYSVM_LAB_ZONES": "5", "SYSVM_NETWORK_GC_WAIT": "30"}
    config = load_config(home, env=env)
    assert config["lab.zones"] == 5
    assert config.sources["lab.zones"] == "env:SYSVM_LAB_ZONES"
    assert config["network.gc.wait"] == 30
    assert config.sources["network.gc.wait"] == "env:SYSVM_NETWORK_GC_WAIT"
    assert config["lab.boot_delay"] == 2.5
    assert config.sources["lab.boot_delay"].startswith("file:")


def test_env_var_names_replace_dots_with_underscores() -> None:
    assert env_var("lab.boot_delay") == "SYSVM_LAB_BOOT_DELAY"
    assert env_var("network.gc.wait") == "SYSVM_NETWORK_GC_WAIT"
    assert env_var("read_only") == "SYSVM_READ_ONLY"


def test_flag_overrides_env_and_names_the_flag(home: Path) -> None:
    env = {"SYSVM_READ_ONLY": "no", "SYSVM_LAB_ZONES": "5"}
    flags = {"read_only": (True, "--read-only"), "lab.zones": ("6", "--zones")}
    config = load_config(home, env=env, flags=flags)
    assert config["read_only"] is True
    assert config.sources["read_only"] == "flag:--read-only"
    assert config["lab.zones"] == 6
    assert config.sources["lab.zones"] == "flag:--zones"


def test_flag_given_as_none_was_not_given(home: Path) -> None:
    config = load_config(home, env={"SYSVM_ASCII": "1"}, flags={"ascii": (None, "--ascii")})
    assert config["ascii"] is True
    assert config.sources["ascii"] == "env:SYSVM_ASCII"


def test_unknown_flag_key_is_an_error_naming_the_flag(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--zonez: unknown setting 'lab\.zonez'"):
        load_config(home, env={}, flags={"lab.zonez": (3, "--zonez")})


def test_malformed_toml_error_names_the_file_and_line(home: Path) -> None:
    path = write_config(home, "[lab]\nzones 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(home, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML")
    assert "line 2" in message
    assert "\n" not in message


def test_unknown_key_in_file_suggests_the_close_match(home: Path) -> None:
    path = write_config(home, "[lab]\nzonez = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(home, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: unknown setting 'lab.zonez'")
    assert "'lab.zones'" in message
    assert "\n" not in message


def test_unknown_table_in_file_is_an_error(home: Path) -> None:
    write_config(home, "[labs]\nzones = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'labs'"):
        load_config(home, env={})


def test_wrong_type_in_file_names_key_and_value(home: Path) -> None:
    path = write_config(home, '[lab]\nzones = "many"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(home, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: lab.zones must be an integer, got 'many'")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("read_only = 1\n", "read_only must be true or false, got 1"),
        ("[lab]\nzones = 2.5\n", "lab.zones must be an integer, got 2.5"),
        ("[lab]\nzones = true\n", "lab.zones must be an integer, got true"),
        ("[lab.zones]\nx = 1\n", "lab.zones must be an integer, got a table"),
        ("theme = 3\n", "theme must be a string, got 3"),
        ("[engine]\nstart_timeout = true\n", "engine.start_timeout must be a number, got true"),
    ],
)
def test_wrong_types_in_file_are_rejected(home: Path, text: str, fragment: str) -> None:
    write_config(home, text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(home, env={})


def test_integer_in_file_is_accepted_for_a_float_setting(home: Path) -> None:
    write_config(home, "[engine]\nstart_timeout = 30\n")
    value = load_config(home, env={})["engine.start_timeout"]
    assert value == 30.0 and isinstance(value, float)


def test_wrong_type_in_env_names_the_variable_key_and_value(home: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(home, env={"SYSVM_LAB_ZONES": "many"})
    message = str(caught.value)
    assert message.startswith("SYSVM_LAB_ZONES: lab.zones must be an integer, got 'many'")
    assert "unset SYSVM_LAB_ZONES" in message


def test_below_minimum_is_rejected_from_every_source(home: Path) -> None:
    path = write_config(home, "[lab]\nzones = 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: lab\.zones must be at least 1, got 0"):
        load_config(home, env={})
    path.unlink()
    with pytest.raises(
        ConfigError,
        match=r"^SYSVM_ENGINE_START_TIMEOUT: engine\.start_timeout must be at least 0\.1",
    ):
        load_config(home, env={"SYSVM_ENGINE_START_TIMEOUT": "0.05"})
    with pytest.raises(ConfigError, match=r"^--vms: lab\.vms must be at least 0, got -1"):
        load_config(home, env={}, flags={"lab.vms": (-1, "--vms")})


def test_minimum_itself_is_accepted(home: Path) -> None:
    config = load_config(home, env={"SYSVM_LAB_ZONES": "1", "SYSVM_LAB_BOOT_DELAY": "0"})
    assert (config["lab.zones"], config["lab.boot_delay"]) == (1, 0.0)


def test_choice_is_matched_case_insensitively_and_others_rejected(home: Path) -> None:
    assert load_config(home, env={"SYSVM_LOG_LEVEL": "debug"})["log.level"] == "DEBUG"
    with pytest.raises(
        ConfigError, match=r"log\.level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"
    ):
        load_config(home, env={"SYSVM_LOG_LEVEL": "LOUD"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
    ],
)
def test_bool_from_env_accepts_common_spellings(home: Path, text: str, expected: bool) -> None:
    config = load_config(home, env={"SYSVM_READ_ONLY": text})
    assert config["read_only"] is expected
    assert config.sources["read_only"] == "env:SYSVM_READ_ONLY"


def test_bool_from_env_rejects_other_words(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SYSVM_ASCII: ascii must be 1/0, true/false"):
        load_config(home, env={"SYSVM_ASCII": "maybe"})


def test_empty_env_var_counts_as_unset(home: Path) -> None:
    config = load_config(home, env={"SYSVM_LAB_ZONES": ""})
    assert config.sources["lab.zones"] == "default"


def test_unknown_sysvm_env_vars_are_ignored(home: Path) -> None:
    config = load_config(home, env={"SYSVM_LAB_ZONEZ": "many", "SYSVM_HOME": str(home)})
    assert config["lab.zones"] == 2


def test_sysvm_home_is_respected(tmp_path: Path, isolated_user_dirs: Path) -> None:
    home = tmp_path / "elsewhere"
    env = {"SYSVM_HOME": str(home)}
    assert home_dir(env) == home
    assert not home.exists(), "home_dir creates nothing"
    home.mkdir()
    path = write_config(home, "[cpvm]\ncapacity = 80\n")
    assert config_file_path(None, env) == path
    config = load_config(env=env)
    assert config.home == home
    assert config["cpvm.capacity"] == 80
    assert config.sources["cpvm.capacity"] == f"file:{path}"


def test_home_defaults_to_the_user_data_dir(isolated_user_dirs: Path) -> None:
    assert home_dir({}) == isolated_user_dirs / "data"
    assert home_dir({"SYSVM_HOME": ""}) == isolated_user_dirs / "data"


def test_describe_lists_every_setting_in_key_order_with_provenance(home: Path) -> None:
    path = write_config(home, "ascii = true\n")
    config = load_config(home, env={"SYSVM_LAB_ZONES": "4"}, flags={"theme": ("dark", "--theme")})
    rows = config.describe()
    assert [row["key"] for row in rows] == sorted(SETTINGS)
    assert all(set(row) == {"key", "value", "source", "help"} for row in rows)
    by_key = {row["key"]: row for row in rows}
    assert by_key["ascii"] == {
        "key": "ascii",
        "value": True,
        "source": f"file:{path}",
        "help": "ASCII instead of box drawing and icons",
    }
    assert by_key["lab.zones"]["source"] == "env:SYSVM_LAB_ZONES"
    assert by_key["theme"]["source"] == "flag:--theme"
    assert by_key["read_only"]["source"] == "default"
    assert by_key["read_only"]["help"] == "refuse every mutating request"


def test_get_of_unknown_key_raises_config_error_not_key_error(home: Path) -> None:
    config = load_config(home, env={})
    with pytest.raises(
        ConfigError, match=r"unknown setting 'lab\.zonez' \(did you mean 'lab\.zones'"
    ):
        config.get("lab.zonez")
    with pytest.raises(ConfigError):
        config["nope"]


def test_config_can_be_built_directly() -> None:
    config = Config(home=Path("/x"), values={"ascii": True}, sources={"ascii": "default"})
    assert config["ascii"] is True
    assert config.file is None


def test_keys_table_remaps_bindings_in_either_toml_spelling(home: Path) -> None:
    write_config(
        home, '[keys]\n"object.destroy" = "X"\nmain.filter = "f"\napp.command = "j,down"\n'
    )
    config = load_config(home=home, env={})
    assert config.keys == {"object.destroy": "X", "main.filter": "f", "app.command": "j,down"}
    rows = {r["key"]: r for r in config.describe()}
    assert rows["keys.object.destroy"]["value"] == "X"
    assert rows["keys.object.destroy"]["source"].startswith("file:")


def test_no_keys_table_means_no_remapping(home: Path) -> None:
    write_config(home, "read_only = true\n")
    assert load_config(home=home, env={}).keys == {}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[keys]\n"object.destroy" = "rm -rf"\n', "keys.object.destroy = 'rm -rf' is not a key"),
        ('[keys]\n"object.destroy" = 3\n', "keys.object.destroy = 3 is not a key name"),
        ('[keys]\n"object.destroy" = ""\n', "keys.object.destroy = '' is not a key name"),
        ('keys = "X"\n', "'keys' must be a table"),
    ],
)
def test_bad_keys_table_is_an_error_naming_the_binding(
    home: Path, text: str, fragment: str
) -> None:
    path = write_config(home, text)
    with pytest.raises(ConfigError) as err:
        load_config(home=home, env={})
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_theme_setting_defaults_to_the_terminal_palette(home: Path) -> None:
    assert load_config(home=home, env={})["theme"] == "ansi"
    with pytest.raises(ConfigError, match="SYSVM_THEME"):
        load_config(home=home, env={"SYSVM_THEME": "no such theme; rm"})
