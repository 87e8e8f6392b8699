"""RemoteEngine: EngineAPI over a websocket (the engine's unix socket today, TLS later)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed

from backend.api.types import EventRecord, JobInfo, StatusTree
from backend.api.wire import error_from_wire, from_wire
from backend.errors import EngineUnavailable

log = logging.getLogger(__name__)
_END = object()


class RemoteEngine:
    """A client of one engine; every EngineAPI method is one request over one connection."""

    def __init__(self, ws: ClientConnection, where: str) -> None:
        self._ws = ws
        self.where = where
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._reader = asyncio.create_task(self._read(), name="engine-client-reader")
        self.closed = asyncio.Event()

    @classmethod
    async def connect_unix(cls, path: Path, *, timeout: float = 5.0) -> RemoteEngine:
        """Connect to an engine's socket; OSError / TimeoutError when nothing answers there."""
        ws = await asyncio.wait_for(
            unix_connect(str(path), uri="ws://localhost/", max_size=64 * 2**20, ping_interval=20),
            timeout,
        )
        return cls(ws, str(path))

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg and msg["id"] is not None:
                    fut = self._pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        if "error" in msg:
                            fut.set_exception(error_from_wire(msg["error"]))
                        else:
                            fut.set_result(msg.get("result"))
                elif msg.get("method") in ("event", "event_end"):
                    queue = self._streams.get(str(msg["params"]["subscription"]))
                    if queue is not None:
                        queue.put_nowait(
                            EventRecord.from_dict(msg["params"]["event"])
                            if msg["method"] == "event"
                            else _END
                        )
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            lost = EngineUnavailable(f"connection to the engine at {self.where} was lost")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(lost)
            self._pending.clear()
            for queue in self._streams.values():
                queue.put_nowait(lost)

    async def call(self, method: str, **params: Any) -> Any:
        if self.closed.is_set():
            raise EngineUnavailable(f"not connected to the engine at {self.where}")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            await self._ws.send(
                json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
            )
        except ConnectionClosed as exc:
            self._pending.pop(req_id, None)
            raise EngineUnavailable(f"connection to the engine at {self.where} was lost") from exc
        return from_wire(method, await fut)

    # -- EngineAPI --------------------------------------------------------------------------

    async def engine_info(self) -> dict[str, Any]:
        return dict(await self.call("engine_info"))

    async def status(self) -> StatusTree:
        result: StatusTree = await self.call("status")
        return result

    async def config_show(self) -> list[dict[str, Any]]:
        return list(await self.call("config_show"))

    async def lab_up(
        self,
        zones: int | None = None,
        hosts: int | None = None,
        networks: int | None = None,
        vms: int | None = None,
        backend: str = "local",
    ) -> JobInfo:
        job: JobInfo = await self.call(
            "lab_up", zones=zones, hosts=hosts, networks=networks, vms=vms, backend=backend
        )
        return job

    async def lab_down(self) -> JobInfo:
        job: JobInfo = await self.call("lab_down")
        return job

    async def jobs(self, limit: int = 100, state: str | None = None) -> list[JobInfo]:
        return list(await self.call("jobs", limit=limit, state=state))

    async def job(self, job_id: int) -> JobInfo:
        job: JobInfo = await self.call("job", job_id=job_id)
        return job

    async def wait_job(self, job_id: int, timeout: float | None = None) -> JobInfo:
        job: JobInfo = await self.call("wait_job", job_id=job_id, timeout=timeout)
        return job

    async def cancel_job(self, job_id: int) -> JobInfo:
        job: JobInfo = await self.call("cancel_job", job_id=job_id)
        return job

    async def events(
        self, since_id: int = 0, limit: int = 200, entity: str | None = None
    ) -> list[EventRecord]:
        return list(await self.call("events", since_id=since_id, limit=limit, entity=entity))

    async def subscribe(self, entities: Iterable[str] | None = None) -> AsyncIterator[EventRecord]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        # The client names the subscription and listens before asking, so no event is missed.
        sid = f"s{next(self._ids)}"
        self._streams[sid] = queue
        try:
            await self.call(
                "subscribe",
                subscription=sid,
                entities=list(entities) if entities is not None else None,
            )
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._streams.pop(sid, None)
            if not self.closed.is_set():
                with contextlib.suppress(Exception):
                    await self.call("unsubscribe", subscription=sid)

    async def system_vms_list(self, zone: str | None = None) -> list[dict[str, Any]]:
        return list(await self.call("system_vms_list", zone=zone))

    async def system_vm(self, name: str) -> dict[str, Any]:
        return dict(await self.call("system_vm", name=name))

    async def console(self, name: str) -> dict[str, Any]:
        return dict(await self.call("console", name=name))

    async def system_vm_action(
        self, name: str, action: str, host: str | None = None, force: bool = False
    ) -> JobInfo:
        job: JobInfo = await self.call(
            "system_vm_action", name=name, action=action, host=host, force=force
        )
        return job

    async def guest_vm_deploy(
        self, network: str, name: str, template: str | None = None
    ) -> JobInfo:
        job: JobInfo = await self.call(
            "guest_vm_deploy", network=network, name=name, template=template
        )
        return job

    async def guest_vm_action(self, name: str, action: str, force: bool = False) -> JobInfo:
        job: JobInfo = await self.call("guest_vm_action", name=name, action=action, force=force)
        return job

    async def network_restart(self, name: str, cleanup: bool = False) -> JobInfo:
        job: JobInfo = await self.call("network_restart", name=name, cleanup=cleanup)
        return job

    async def templates_list(self, zone: str | None = None) -> list[dict[str, Any]]:
        return list(await self.call("templates_list", zone=zone))

    async def template_register(
        self, zone: str, name: str, url: str, format: str, checksum: str | None = None
    ) -> JobInfo:
        job: JobInfo = await self.call(
            "template_register", zone=zone, name=name, url=url, format=format, checksum=checksum
        )
        return job

    async def template_upload(
        self, zone: str, name: str, path: str, format: str, checksum: str | None = None
    ) -> JobInfo:
        job: JobInfo = await self.call(
            "template_upload", zone=zone, name=name, path=path, format=format, checksum=checksum
        )
        return job

    async def template_delete(self, zone: str, name: str) -> JobInfo:
        job: JobInfo = await self.call("template_delete", zone=zone, name=name)
        return job

    async def router_show(self, network: str) -> dict[str, Any]:
        return dict(await self.call("router_show", network=network))

    async def router_diff(self, network: str) -> dict[str, Any]:
        return dict(await self.call("router_diff", network=network))

    async def router_apply(self, network: str, confirm_timeout: float = 30.0) -> JobInfo:
        job: JobInfo = await self.call(
            "router_apply", network=network, confirm_timeout=confirm_timeout
        )
        return job

    async def router_check(self, network: str) -> dict[str, Any]:
        return dict(await self.call("router_check", network=network))

    async def router_rule_add(
        self, network: str, type: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        return dict(await self.call("router_rule_add", network=network, type=type, fields=fields))

    async def router_rule_replace(
        self, network: str, rule_id: int, type: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        return dict(
            await self.call(
                "router_rule_replace", network=network, rule_id=rule_id, type=type, fields=fields
            )
        )

    async def router_rule_delete(self, network: str, rule_id: int) -> dict[str, Any]:
        return dict(await self.call("router_rule_delete", network=network, rule_id=rule_id))

    async def host_add(self, zone: str, name: str, uri: str) -> dict[str, Any]:
        return dict(await self.call("host_add", zone=zone, name=name, uri=uri))

    async def lab_crash(self, vm: str, undefine: bool = False) -> dict[str, Any]:
        return dict(await self.call("lab_crash", vm=vm, undefine=undefine))

    async def lab_host(self, host: str, up: bool) -> dict[str, Any]:
        return dict(await self.call("lab_host", host=host, up=up))

    async def shutdown(self) -> None:
        await self.call("shutdown")
