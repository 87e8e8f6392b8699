"""The `:` language on its own: parsing and completion (no screen, no engine needed)."""

from __future__ import annotations

from tui_app.command_line import Command, ObjectName, complete, parse

OBJECTS = [
    ObjectName("zone1", "zone", "zone", "zone1"),
    ObjectName("zone2", "zone", "zone", "zone2"),
    ObjectName("s-1-VM", "system_vm", "SSVM", "zone1"),
    ObjectName("zone1-net1", "network", "network", "zone1"),
    ObjectName("zone2-net1", "network", "network", "zone2"),
    ObjectName("zone1-net1-vm1", "guest_vm", "guest VM", "zone1"),
]


def test_command_words_parse_with_their_argument() -> None:
    assert parse(":zone zone2") == Command("zone", "zone2")
    assert parse("router  zone1-net1 ") == Command("router", "zone1-net1")
    assert parse("ssvm") == Command("ssvm")
    assert parse(":q") == Command("q")
    assert parse("JOBS") == Command("jobs")


def test_anything_else_names_an_object() -> None:
    command = parse(":zone1-net1-vm1")
    assert command.is_object and command.argument == "zone1-net1-vm1"


def test_an_empty_line_lists_every_command() -> None:
    words = [c.text.strip() for c in complete("", OBJECTS)]
    assert words[:4] == ["zone", "ssvm", "cpvm", "router"]
    assert {"jobs", "events", "q"} <= set(words)


def test_a_prefix_completes_commands_then_object_names() -> None:
    texts = [c.text for c in complete("zo", OBJECTS)]
    assert texts[0] == "zone ", "a command taking an argument completes with a space"
    assert texts[1:] == ["zone1", "zone2", "zone1-net1", "zone2-net1", "zone1-net1-vm1"]
    assert [c.text for c in complete("s-", OBJECTS)] == ["s-1-VM"]
    assert complete("s-", OBJECTS)[0].hint == "SSVM in zone1"


def test_arguments_complete_from_the_right_kind_of_object() -> None:
    assert [c.text for c in complete("zone z", OBJECTS)] == ["zone zone1", "zone zone2"]
    assert [c.text for c in complete("router zone2", OBJECTS)] == ["router zone2-net1"]
    assert complete("jobs x", OBJECTS) == []
