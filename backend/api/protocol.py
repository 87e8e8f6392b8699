"""EngineAPI: the one contract between every front end (TUI, CLI, scripts) and the engine.

It is served in-process (`backend.engine.core.Engine`) and over websockets JSON-RPC
(`backend.api.server` / `backend.api.client.RemoteEngine`); both pass the same test suite.
Every method may raise a `backend.errors.SysvmError` subclass whose message an operator can act on.
Wire format: see `backend/api/README.md`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, runtime_checkable

from backend.api.types import EventRecord, JobInfo, StatusTree

# Methods that change state; a read-only engine or client refuses them (ReadOnly).
MUTATING = frozenset(
    {
        "lab_up",
        "lab_down",
        "cancel_job",
        "system_vm_action",
        "guest_vm_deploy",
        "guest_vm_action",
        "network_restart",
        "template_register",
        "template_upload",
        "template_delete",
        "router_apply",
        "router_rule_add",
        "router_rule_replace",
        "router_rule_delete",
        "host_add",
        "lab_crash",
        "lab_host",
    }
)


@runtime_checkable
class EngineAPI(Protocol):
    async def engine_info(self) -> dict[str, Any]:
        """Who answers: pid, version, home, schema revision, uptime seconds, read_only."""
        ...

    async def status(self) -> StatusTree:
        """The whole tree: zones -> hosts, system VMs, networks -> router, guest VMs."""
        ...

    async def config_show(self) -> list[dict[str, Any]]:
        """Effective settings: [{key, value, source, help}] (source says where it came from)."""
        ...

    async def lab_up(
        self,
        zones: int | None = None,
        hosts: int | None = None,
        networks: int | None = None,
        vms: int | None = None,
        backend: str = "local",
    ) -> JobInfo:
        """Start building (idempotently) the embedded lab; returns the `lab.up` job at once.
        None takes the `lab.*` setting; `backend` is local or netns (root: routers and guest
        VMs as network namespaces). Raises InvalidInput naming the field."""
        ...

    async def lab_down(self) -> JobInfo:
        """Start removing everything the lab made; returns the `lab.down` job."""
        ...

    async def jobs(self, limit: int = 100, state: str | None = None) -> list[JobInfo]:
        """Recent jobs, newest first, optionally only those in `state`."""
        ...

    async def job(self, job_id: int) -> JobInfo:
        """One job (NotFound if it does not exist)."""
        ...

    async def wait_job(self, job_id: int, timeout: float | None = None) -> JobInfo:
        """Wait until the job finishes or `timeout` seconds pass; returns it either way."""
        ...

    async def cancel_job(self, job_id: int) -> JobInfo:
        """Cancel a queued or running job (Conflict if it already finished)."""
        ...

    async def events(
        self, since_id: int = 0, limit: int = 200, entity: str | None = None
    ) -> list[EventRecord]:
        """Persisted events after `since_id`, oldest first."""
        ...

    def subscribe(self, entities: Iterable[str] | None = None) -> AsyncIterator[EventRecord]:
        """Live events from now on (all entities, or only those named: zone, host, system_vm,
        network, guest_vm, job, ...). Ends when the engine goes away."""
        ...

    async def system_vms_list(self, zone: str | None = None) -> list[dict[str, Any]]:
        """System VMs (all zones, or one) with id, name, type, state, zone, host, network,
        control_ip, started_at, last_error, boot_args and nics [{device, role, ip, netmask, mac}]."""
        ...

    async def system_vm(self, name: str) -> dict[str, Any]:
        """One system VM, as in `system_vms_list` (NotFound if there is none of that name)."""
        ...

    async def console(self, name: str) -> dict[str, Any]:
        """Where the console of system VM or guest VM `name` is: {vm, kind, state, host, uri,
        vnc: {listen, port} | None, connect: [commands for the jump host], reason (when vnc is
        None)}. NotFound if there is no VM of that name."""
        ...

    async def system_vm_action(
        self, name: str, action: str, host: str | None = None, force: bool = False
    ) -> JobInfo:
        """Start a job: `action` is start | stop | reboot | destroy | migrate. `host` is the
        migration target (default: the least loaded other Up host of the zone); `force` powers
        off at once on stop. Destroyed SSVMs/CPVMs are replaced by the zone's reconciler."""
        ...

    async def guest_vm_deploy(
        self, network: str, name: str, template: str | None = None
    ) -> JobInfo:
        """Start a job deploying and starting guest VM `name` on `network` (its router first),
        from `template` (copied to the host's primary storage on first use) or diskless."""
        ...

    async def guest_vm_action(self, name: str, action: str, force: bool = False) -> JobInfo:
        """Start a job: `action` is start | stop | destroy."""
        ...

    async def network_restart(self, name: str, cleanup: bool = False) -> JobInfo:
        """Start a job restarting the network's router; `cleanup` destroys it and makes a new one."""
        ...

    async def templates_list(self, zone: str | None = None) -> list[dict[str, Any]]:
        """Templates (all zones or one): id, name, zone, format, state, url (credentials
        removed), checksum, size, virtual_size, system, error, transfer {state, bytes_done,
        bytes_total, ssvm, reason, job_id} | null."""
        ...

    async def template_register(
        self, zone: str, name: str, url: str, format: str, checksum: str | None = None
    ) -> JobInfo:
        """Register a template from an http(s) URL: the zone's SSVM downloads it with progress.
        `format` is QCOW2 | RAW | ISO; `checksum` CloudStack's `{SHA-256}hex` (or a bare MD5)."""
        ...

    async def template_upload(
        self, zone: str, name: str, path: str, format: str, checksum: str | None = None
    ) -> JobInfo:
        """Upload a file that the engine's machine can read to the zone's SSVM, with progress."""
        ...

    async def template_delete(self, zone: str, name: str) -> JobInfo:
        """Start a job removing a template's files (through the zone's SSVM) and its record."""
        ...

    async def router_show(self, network: str) -> dict[str, Any]:
        """The network's router config: {network, router, router_state, public_ip, version,
        digest, live_digest, drift, pending, rules: [{id, type, ...fields}]}."""
        ...

    async def router_diff(self, network: str) -> dict[str, Any]:
        """What applying would change since the last applied version: added, removed, changed."""
        ...

    async def router_apply(self, network: str, confirm_timeout: float = 30.0) -> JobInfo:
        """Start a job pushing the desired rules as the next version. With a confirm window
        (seconds, 0 = none) the engine confirms over a new SSH connection; unconfirmed, the
        router rolls back to the previous version by itself."""
        ...

    async def router_check(self, network: str) -> dict[str, Any]:
        """Read back what is live on the router: {network, router, version, digest,
        live_version, live_digest, drift}."""
        ...

    async def router_rule_add(
        self, network: str, type: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        """Validate and store a rule (firewall-ingress, firewall-egress, port-forward, static-nat,
        source-nat, load-balancer, dhcp-entry, dns-entry, remote-access-vpn); InvalidInput names
        the field (dotted path). It takes effect with the next apply."""
        ...

    async def router_rule_replace(
        self, network: str, rule_id: int, type: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        """Change rule `rule_id` in place (it keeps its id), validated as `router_rule_add` but
        against the network's other rules; on InvalidInput the old rule stays as it was."""
        ...

    async def router_rule_delete(self, network: str, rule_id: int) -> dict[str, Any]:
        """Remove a rule; it takes effect with the next apply."""
        ...

    async def host_add(self, zone: str, name: str, uri: str) -> dict[str, Any]:
        """Add a libvirt host (qemu:///system, qemu+ssh://user@host/system, ...) to a zone.
        It must answer first (HypervisorError naming host and URI otherwise); nothing is
        stored for a host that does not."""
        ...

    async def lab_crash(self, vm: str, undefine: bool = False) -> dict[str, Any]:
        """Lab fault injection: destroy (or undefine) a VM's domain directly on its host, as
        `virsh destroy` would; the engine learns of it from libvirt's lifecycle event."""
        ...

    async def lab_host(self, host: str, up: bool) -> dict[str, Any]:
        """Lab fault injection: make a lab host's libvirt connection fail (up=False) or recover."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine cleanly: jobs are interrupted (resumable ones resume on next start)."""
        ...
