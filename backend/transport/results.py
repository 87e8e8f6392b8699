"""What a command on a system VM answers, shared by the engine's transport and its SSH worker."""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import TransportError


@dataclass(frozen=True)
class CommandResult:
    """What a command on a system VM answered: exit status (negative signal number if killed) and output."""

    exit_status: int
    stdout: str
    stderr: str


class CommandFailed(TransportError):
    """A streamed command exited non-zero; its stdout lines were already yielded (the last usually says why)."""

    code = "command_failed"

    def __init__(self, message: str, exit_status: int, stderr_tail: str) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail
