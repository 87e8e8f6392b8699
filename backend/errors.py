"""Errors an operator can act on. The CLI prints them as one line; the TUI shows them in words."""

from __future__ import annotations


class SysvmError(Exception):
    """Base of every error sysvm reports to an operator (message says what is wrong and what to do)."""

    code = "error"


class ConfigError(SysvmError):
    """The configuration file, an environment variable or a flag holds a bad value."""

    code = "config"


class NotFound(SysvmError):
    """The named object does not exist."""

    code = "not_found"


class InvalidInput(SysvmError):
    """A request field is invalid; the message names the field."""

    code = "invalid"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str]]:
        return type(self), (self.field, self.reason)  # pickled from the database's worker


class Conflict(SysvmError):
    """The request conflicts with the current state (wrong VM state, address taken, ...)."""

    code = "conflict"


class EngineUnavailable(SysvmError):
    """No engine answers on this home's socket and none could be started."""

    code = "engine_unavailable"


class SchemaTooNew(SysvmError):
    """The database was written by a newer sysvm; this one refuses to touch it."""

    code = "schema_too_new"


class ReadOnly(SysvmError):
    """A mutating request was refused because the engine or client is read-only."""

    code = "read_only"


class TransportError(SysvmError):
    """A system VM could not be reached over SSH, or the session broke; the message names address:port."""

    code = "transport"


class TransportTimeout(TransportError):
    """Connecting to a system VM, or a command on it, took longer than its timeout."""

    code = "transport_timeout"


class HostKeyMismatch(SysvmError):
    """A system VM presented a host key other than the one generated for it at provisioning."""

    code = "host_key_mismatch"


class EngineAlreadyRunning(SysvmError):
    """Another engine holds this home's lock."""

    code = "engine_already_running"
