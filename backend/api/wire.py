"""The wire form of EngineAPI values and errors, shared by the server and the client."""

from __future__ import annotations

from typing import Any

from backend import errors
from backend.api.types import EventRecord, JobInfo

# Methods served over the socket (EngineAPI minus `subscribe`, which has its own messages).
METHODS = (
    "engine_info",
    "status",
    "config_show",
    "lab_up",
    "lab_down",
    "jobs",
    "job",
    "wait_job",
    "cancel_job",
    "events",
    "system_vms_list",
    "system_vm",
    "console",
    "system_vm_action",
    "guest_vm_deploy",
    "guest_vm_action",
    "network_restart",
    "templates_list",
    "template_register",
    "template_upload",
    "template_delete",
    "router_show",
    "router_diff",
    "router_apply",
    "router_check",
    "router_rule_add",
    "router_rule_replace",
    "router_rule_delete",
    "host_add",
    "lab_crash",
    "lab_host",
    "shutdown",
)


def to_wire(value: Any) -> Any:
    """JobInfo / EventRecord (or lists of them) become plain dicts; the rest is JSON already."""
    if isinstance(value, JobInfo | EventRecord):
        return value.to_dict()
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    return value


def from_wire(method: str, value: Any) -> Any:
    """Rebuild the typed result of `method` from its wire form."""
    if method in (
        "lab_up",
        "lab_down",
        "job",
        "wait_job",
        "cancel_job",
        "system_vm_action",
        "guest_vm_deploy",
        "guest_vm_action",
        "network_restart",
        "template_register",
        "template_upload",
        "template_delete",
        "router_apply",
    ):
        return JobInfo.from_dict(value)
    if method == "jobs":
        return [JobInfo.from_dict(v) for v in value]
    if method == "events":
        return [EventRecord.from_dict(v) for v in value]
    return value


def _error_classes() -> dict[str, type[errors.SysvmError]]:
    found: dict[str, type[errors.SysvmError]] = {}
    stack: list[type[errors.SysvmError]] = [errors.SysvmError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return found


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.InvalidInput):
        return {"code": exc.code, "message": str(exc), "field": exc.field, "reason": exc.reason}
    if isinstance(exc, errors.SysvmError):
        return {"code": exc.code, "message": str(exc)}
    return {
        "code": "internal",
        "message": f"internal error: {type(exc).__name__}: {exc} (details in engine.log)",
    }


def error_from_wire(data: dict[str, Any]) -> errors.SysvmError:
    code = str(data.get("code", "error"))
    message = str(data.get("message", "unknown error"))
    if code == errors.InvalidInput.code and "field" in data:
        return errors.InvalidInput(str(data["field"]), str(data.get("reason", message)))
    cls = _error_classes().get(code, errors.SysvmError)
    try:
        return cls(message)
    except TypeError:
        return errors.SysvmError(message)
