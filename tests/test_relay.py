"""The relay sshd runs for every command of a netns router: its hand-written JSON request header,
its framed answers, and its start (which every SSH command pays)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from backend.appliance import relay
from backend.appliance.service_socket import framed_answer
from tests.startup_modules import modules_added_by

ROOT = Path(__file__).resolve().parent.parent


@given(st.text())
def test_the_request_header_string_is_what_json_dumps_writes(text: str) -> None:
    assert relay.json_string(text) == json.dumps(text)
    assert json.loads(relay.json_string(text)) == text


def test_an_undecodable_command_crosses_as_json_dumps_would_send_it() -> None:
    text = b"sysvm-router show \xff\xfe".decode("utf-8", errors="surrogateescape")
    assert relay.json_string(text) == json.dumps(text)


def _relay_prints(answer: bytes) -> subprocess.CompletedProcess[bytes]:
    code = (
        "import sys; from backend.appliance import relay; "
        "sys.exit(relay._print_answer(sys.stdin.buffer.read()))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], input=answer, capture_output=True, env=env
    )


def test_a_framed_answer_is_printed_byte_for_byte_with_its_status() -> None:
    out = '{"version": 3, "name": "r\\u00e9"}\nsecond line é\n'
    done = _relay_prints(framed_answer(7, out, "warn ü\n"))
    assert done.returncode == 7
    assert done.stdout == out.encode() and done.stderr == "warn ü\n".encode()


def test_a_json_answer_of_an_older_service_is_still_understood() -> None:
    answer = json.dumps({"status": 3, "stdout": "x\n", "stderr": "y\n"}).encode() + b"\n"
    done = _relay_prints(answer)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"x\n", b"y\n")


def test_a_cut_answer_is_reported_and_fails() -> None:
    done = _relay_prints(framed_answer(0, "0123456789", "")[:-3])
    assert done.returncode == 1 and b"gave no answer" in done.stderr


def test_the_relay_imports_no_module_that_triples_its_start() -> None:
    """Run as a file, it loads neither json, socket, threading, re nor enum: each SSH command
    would pay their import (~40 ms of start against ~13 ms; measured by bench_router_apply)."""
    added = modules_added_by(relay.__file__)
    assert "backend.appliance.service_socket" in added  # the probe did load the relay
    assert not added & {"json", "socket", "threading", "re", "enum", "typing", "runpy"}, added


def test_an_answer_holding_a_lone_surrogate_is_still_framed_and_printed() -> None:
    done = _relay_prints(framed_answer(2, "ok\n", "bad \udcff byte\n"))
    assert done.returncode == 2 and done.stdout == b"ok\n"
    assert done.stderr == b"bad \\udcff byte\n"
