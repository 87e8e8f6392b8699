"""sshd's ForceCommand for a netns router: hand the session to the router's appliance service.

Connects to the service's abstract socket (`backend.appliance.router_service`), sends the
session's command (`SSH_ORIGINAL_COMMAND`, never given to a shell) and its stdin, prints the one
answer and exits with its status. When the service does not answer (not started yet, or gone), the
command runs in this process instead (`backend.appliance.forced_command`), with the same result,
only slower.

Every SSH command pays this program's start, so it imports nothing it can do without: it is run
as a file (`python -S .../relay.py`: no site-packages, no runpy) and uses the interpreter's
built-in `_socket` and `_thread` (the `socket`, `threading` and `json` modules, with the `enum`,
`re` and `collections` they load, tripled its start: ~40 ms against ~13 ms). The request header is
JSON written by hand; the answer comes framed (`_FRAME`) rather than as JSON.
"""

from __future__ import annotations

import _socket
import _thread
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a file: its directory must not shadow modules by name

from backend.appliance.service_socket import ANSWER_FRAME, socket_name  # noqa: E402

CONNECT_TIMEOUT = 2.0
CHUNK = 1 << 20


def _vm_of(argv: list[str]) -> str | None:
    for i, word in enumerate(argv[:-1]):
        if word == "--vm":
            return argv[i + 1]
    return None


_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}


def json_string(text: str) -> str:
    """`text` as a JSON string, ASCII only (as `json.dumps` writes it, lone surrogates of
    undecodable bytes included)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if 0x20 <= code < 0x7F and ch != '"' and ch != "\\":
            out.append(ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def _pump_stdin(sock: _socket.socket) -> None:
    """Copy this session's stdin to the service, then tell it the input ended."""
    try:
        while chunk := os.read(0, CHUNK):
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _relay(name: str, command: str) -> int | None:
    """The command's exit status, or None when the service cannot be reached."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(name)
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    try:
        header = '{"command": ' + json_string(command) + ', "answer": "frame"}\n'
        sock.sendall(header.encode("ascii"))
        _thread.start_new_thread(_pump_stdin, (sock,))
        answer = bytearray()
        while chunk := sock.recv(CHUNK):
            answer += chunk
    finally:
        sock.close()
    return _print_answer(bytes(answer))


def _print_answer(answer: bytes) -> int:
    """Print the service's answer; its exit status. A service older than this relay answers
    in JSON."""
    head, _, body = answer.partition(b"\n")
    words = head.split()
    if len(words) == 4 and words[0] == ANSWER_FRAME and all(w.isdigit() for w in words[1:]):
        status, out_len, err_len = (int(w) for w in words[1:])
        if len(body) == out_len + err_len:
            _write_all(1, body[:out_len])
            _write_all(2, body[out_len:])
            return status
    elif answer.startswith(b"{"):
        import json

        try:
            reply = json.loads(answer)
            _write_all(1, str(reply.get("stdout", "")).encode())
            _write_all(2, str(reply.get("stderr", "")).encode())
            return int(reply.get("status", 1))
        except (ValueError, AttributeError, TypeError):
            pass
    _write_all(2, b"the router's appliance service gave no answer\n")
    return 1


def main() -> None:
    vm = _vm_of(sys.argv[1:])
    status = None
    if vm is not None:
        status = _relay(socket_name(vm), os.environ.get("SSH_ORIGINAL_COMMAND", ""))
    if status is None:
        from backend.appliance import forced_command

        forced_command.main(sys.argv[1:])  # exits
        return
    os._exit(status)


if __name__ == "__main__":
    main()
