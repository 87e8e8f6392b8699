"""Serve an EngineAPI over websockets: JSON-RPC 2.0 requests plus event notifications.

One task per request, so a long `wait_job` never holds up a `status` on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import types
import typing
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from backend.api.protocol import MUTATING, EngineAPI
from backend.api.wire import METHODS, error_to_wire, to_wire
from backend.errors import InvalidInput, ReadOnly, SysvmError

log = logging.getLogger(__name__)


def _check_types(method: str, fn: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Bind JSON params to the method's signature and check simple types (int/float/str)."""
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(**params)
    except TypeError as exc:
        raise InvalidInput("params", f"{method}: {exc}") from exc
    hints = typing.get_type_hints(fn)
    for name, value in bound.arguments.items():
        allowed = hints.get(name)
        if allowed is None or value is None:
            continue
        kinds = typing.get_args(allowed) if isinstance(allowed, types.UnionType) else (allowed,)
        ok = any(
            k in (int, float, str, bool)
            and isinstance(value, k)
            and not (k in (int, float) and isinstance(value, bool))
            or (k is float and isinstance(value, int) and not isinstance(value, bool))
            for k in kinds
            if isinstance(k, type)
        )
        simple = [k for k in kinds if k in (int, float, str, bool)]
        if simple and not ok:
            expected = " or ".join(k.__name__ for k in simple)
            raise InvalidInput(name, f"must be {expected}, got {type(value).__name__}")
    return dict(bound.arguments)


class ApiServer:
    """Dispatches one connection's messages to `api`; `read_only` refuses mutating methods."""

    def __init__(self, api: EngineAPI, *, read_only: bool = False) -> None:
        self.api = api
        self.read_only = read_only

    async def handle(self, ws: ServerConnection) -> None:
        tasks: set[asyncio.Task[None]] = set()
        subscriptions: dict[str, asyncio.Task[None]] = {}
        send_lock = asyncio.Lock()

        async def send(message: dict[str, Any]) -> None:
            async with send_lock:
                await ws.send(json.dumps(message, separators=(",", ":")))

        try:
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                    if not isinstance(msg, dict):
                        raise ValueError("a request must be a JSON object")
                except ValueError as exc:
                    await send(
                        {
                            "jsonrpc": "2.0",
                            "id": None,
                            "error": {"code": "parse", "message": f"bad request: {exc}"},
                        }
                    )
                    continue
                task = asyncio.create_task(self._one(msg, send, subscriptions))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except ConnectionClosed:
            pass
        finally:
            for t in [*tasks, *subscriptions.values()]:
                t.cancel()
            await asyncio.gather(*tasks, *subscriptions.values(), return_exceptions=True)

    async def _one(
        self, msg: dict[str, Any], send: Any, subscriptions: dict[str, asyncio.Task[None]]
    ) -> None:
        req_id = msg.get("id")
        method = msg.get("method")
        params = msg.get("params") or {}
        try:
            if not isinstance(params, dict):
                raise InvalidInput("params", "must be an object of named parameters")
            if method == "subscribe":
                result: Any = self._subscribe(params, send, subscriptions)
            elif method == "unsubscribe":
                task = subscriptions.pop(str(params.get("subscription")), None)
                if task:
                    task.cancel()
                result = None
            elif method in METHODS:
                if self.read_only and method in MUTATING:
                    raise ReadOnly(f"{method} refused: this engine connection is read-only")
                fn = getattr(self.api, str(method))
                kwargs = _check_types(str(method), fn, params)
                result = to_wire(await fn(**kwargs))
            else:
                raise InvalidInput("method", f"unknown method {method!r}")
            reply = {"jsonrpc": "2.0", "id": req_id, "result": result}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, SysvmError):
                log.exception("request %s failed", method)
            reply = {"jsonrpc": "2.0", "id": req_id, "error": error_to_wire(exc)}
        with contextlib.suppress(ConnectionClosed):
            await send(reply)

    def _subscribe(
        self, params: dict[str, Any], send: Any, subscriptions: dict[str, asyncio.Task[None]]
    ) -> dict[str, str]:
        entities = params.get("entities")
        if entities is not None and (
            not isinstance(entities, list) or not all(isinstance(e, str) for e in entities)
        ):
            raise InvalidInput("entities", "must be a list of entity names")
        sid = params.get("subscription")
        if not isinstance(sid, str) or not sid or len(sid) > 64:
            raise InvalidInput("subscription", "must be a non-empty name of at most 64 characters")
        if sid in subscriptions:
            raise InvalidInput("subscription", f"{sid!r} is already in use on this connection")
        stream = self.api.subscribe(entities)

        async def forward() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for event in stream:
                    await send(
                        {
                            "jsonrpc": "2.0",
                            "method": "event",
                            "params": {"subscription": sid, "event": event.to_dict()},
                        }
                    )
                # The engine is going away: tell the subscriber its stream ended.
                await send(
                    {"jsonrpc": "2.0", "method": "event_end", "params": {"subscription": sid}}
                )

        subscriptions[sid] = asyncio.create_task(forward(), name=f"subscription-{sid}")
        return {"subscription": sid}
