"""sshd's ForceCommand for a netns router: hand the session to the router's appliance service.

Connects to the service's abstract socket (`backend.appliance.router_service`), sends the
session's command (`SSH_ORIGINAL_COMMAND`, never given to a shell) and its stdin, prints the one
answer and exits with its status. Standard library only and nothing else imported, so a session
costs the interpreter's start and not the appliance's (0.2 s): the work is done by a process that
keeps the router's parsed state. When the service does not answer (not started yet, or gone), the
command runs in this process instead (`backend.appliance.forced_command`), with the same result,
only slower.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

from backend.appliance.service_socket import socket_name

CONNECT_TIMEOUT = 2.0
CHUNK = 1 << 20


def _vm_of(argv: list[str]) -> str | None:
    for i, word in enumerate(argv[:-1]):
        if word == "--vm":
            return argv[i + 1]
    return None


def _pump_stdin(sock: socket.socket) -> None:
    """Copy this session's stdin to the service, then tell it the input ended."""
    try:
        while chunk := os.read(0, CHUNK):
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _relay(name: str, command: str) -> int | None:
    """The command's exit status, or None when the service cannot be reached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(name)
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    with sock:
        sock.sendall((json.dumps({"command": command}) + "\n").encode())
        threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
        answer = bytearray()
        while chunk := sock.recv(CHUNK):
            answer += chunk
    try:
        reply = json.loads(answer)
    except ValueError:
        sys.stderr.write("the router's appliance service gave no answer\n")
        return 1
    sys.stdout.write(reply.get("stdout", ""))
    sys.stderr.write(reply.get("stderr", ""))
    return int(reply.get("status", 1))


def main() -> None:
    vm = _vm_of(sys.argv[1:])
    status = None
    if vm is not None:
        status = _relay(socket_name(vm), os.environ.get("SSH_ORIGINAL_COMMAND", ""))
    if status is None:
        from backend.appliance import forced_command

        forced_command.main(sys.argv[1:])  # exits
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
