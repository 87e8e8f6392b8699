"""libvirt's events on the asyncio loop, safe for libvirt calls made from worker threads.

libvirtaio assumes every libvirt call happens on the loop's thread: when a call made in an
executor thread makes libvirt add, update or remove a watch or a timer, libvirtaio touches the
loop from that thread (asyncio forbids it; debug mode raises "Non-thread-safe operation"). Our
libvirt calls all run in worker threads (they block), so this implementation hands every such
change to the loop in order, through `call_soon_threadsafe`, and never blocks the caller: the
ids libvirt needs back are allocated at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import libvirtaio

log = logging.getLogger(__name__)


class LoopSafeEventImpl(libvirtaio.virEventAsyncIOImpl):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop_thread = threading.get_ident()
        self._ops: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._ops_lock = threading.Lock()

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop, after every change queued before it."""
        if threading.get_ident() == self._loop_thread:
            self._drain()
            fn(*args)
            return
        with self._ops_lock:
            self._ops.append((fn, args))
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while True:
            with self._ops_lock:
                if not self._ops:
                    return
                fn, args = self._ops.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("libvirt event bookkeeping failed")

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=None, event=event)
        self._on_loop(self._install_handle, callback, fd)
        return int(callback.iden)

    def _install_handle(self, callback: Any, fd: int) -> None:
        callback.descriptor = self.descriptors[fd]
        self.callbacks[callback.iden] = callback
        callback.descriptor.add_handle(callback)
        self._pending_inc()

    def _update_handle(self, watch: int, event: int) -> None:
        self._on_loop(super()._update_handle, watch, event)

    def _remove_handle(self, watch: int) -> int:
        self._on_loop(super()._remove_handle, watch)
        return 0

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        callback = libvirtaio.TimeoutCallback(self, cb, opaque)
        self._on_loop(self._install_timeout, callback, timeout)
        return int(callback.iden)

    def _install_timeout(self, callback: Any, timeout: int) -> None:
        self.callbacks[callback.iden] = callback
        callback.update(timeout=timeout)
        self._pending_inc()

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._on_loop(super()._update_timeout, timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        self._on_loop(super()._remove_timeout, timer)
        return 0


def register(loop: asyncio.AbstractEventLoop) -> LoopSafeEventImpl:
    """Make `loop` libvirt's event loop (once per process: libvirt allows one)."""
    impl = LoopSafeEventImpl(loop).register()
    libvirtaio._current_impl = impl
    return impl
