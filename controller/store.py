"""The served policy and the one before it; hot swap, rollback and file watching.

Handlers read `store.current` once per request and use that object to the end, so a swap (one
attribute assignment on the event loop) never changes a request half way. Loading and validating
a new file happen in a worker thread; the event loop keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from controller.contract import interface_change
from controller.decoding import clipped
from controller.policy import (
    Policy,
    PolicyLoadError,
    PolicyReadError,
    load_policy,
    read_policy_file,
)

log = logging.getLogger(__name__)


class SwapRefused(Exception):
    """A load or rollback that was refused; the current policy keeps serving."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PolicyStore:
    """Holds the current and previous policy; versions are assigned 1, 2, 3, ... per load."""

    def __init__(
        self,
        initial: Policy,
        on_swap: Callable[[Policy], None] | None = None,
        *,
        next_version: int | None = None,
    ) -> None:
        self.current = initial
        self.previous: Policy | None = None
        self._next_version = initial.version + 1 if next_version is None else next_version
        self._on_swap = on_swap
        #: Called in the loader thread with a policy about to be swapped in (fine-tuning makes
        #: it durable there); a SwapRefused it raises refuses a load.
        self.before_swap: Callable[[Policy], None] | None = None
        self._lock = asyncio.Lock()
        #: Bumped by every swap and by notify(): WatchPolicy streams send an update per change.
        self.generation = 0
        self._waiters: list[asyncio.Future[None]] = []
        # One loader thread: loads are rare, and serialising them keeps versions in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-load")

    @classmethod
    def from_file(cls, path: Path, on_swap: Callable[[Policy], None] | None = None) -> PolicyStore:
        """Load version 1 synchronously (before serving starts). Raises PolicyLoadError."""
        policy = load_policy(read_policy_file(path), source=str(path), version=1)
        store = cls(policy, on_swap)
        if on_swap is not None:
            on_swap(policy)
        return store

    async def load_path(self, path: str | Path) -> Policy:
        return await self._load(
            lambda v: load_policy(read_policy_file(path), source=str(path), version=v), str(path)
        )

    async def load_bytes(self, data: bytes) -> Policy:
        return await self._load(lambda v: load_policy(data, source="<bytes>", version=v), "<bytes>")

    async def load_loaded(self, policy: Policy) -> Policy:
        """Swap in `policy`, already loaded and checked (a gated candidate), as the next version."""
        return await self._load(lambda v: dataclasses.replace(policy, version=v), policy.source)

    async def rollback(self) -> Policy:
        async with self._lock:
            if self.previous is None:
                raise SwapRefused(
                    grpc.StatusCode.FAILED_PRECONDITION, "no previous policy to roll back to"
                )
            try:
                await self._before_swap(self.previous)
            except SwapRefused as e:  # a rollback is a safety action: it happens regardless
                log.error("rolling back anyway, unrecorded: %s", e.message)
            self._swap(self.previous)
            log.info("rolled back to version %d (%s)", self.current.version, self.current.source)
            return self.current

    async def _load(self, make: Callable[[int], Policy], source: str) -> Policy:
        """`make(version)` builds the policy in the loader thread."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            version = self._next_version
            try:
                policy = await loop.run_in_executor(self._executor, make, version)
            except PolicyLoadError as e:
                log.warning("refused policy %s: %s", clipped(source), e)
                code = (
                    grpc.StatusCode.NOT_FOUND
                    if isinstance(e, PolicyReadError)
                    else grpc.StatusCode.INVALID_ARGUMENT
                )
                raise SwapRefused(code, str(e)) from None
            self._check_compatible(policy)
            self._next_version += 1  # taken even if refused below: it may be on disk already
            await self._before_swap(policy)
            self._swap(policy)
            log.info(
                "serving %s version %d (sha256 %s), previous %d",
                source,
                version,
                policy.sha256[:12],
                self.previous.version if self.previous else 0,
            )
            return policy

    async def _before_swap(self, policy: Policy) -> None:
        if self.before_swap is not None:
            hook = self.before_swap
            await asyncio.get_running_loop().run_in_executor(self._executor, hook, policy)

    def _check_compatible(self, new: Policy) -> None:
        """Clients mid-stream rely on the interface: env id, dimensions and history must not
        change."""
        change = interface_change(new, self.current)
        if change is not None:
            what, a, b = change
            raise SwapRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{new.source} has {what} {a}; the served policy has {b}. "
                "Start another server to serve a different interface.",
            )

    def _swap(self, policy: Policy) -> None:
        self.previous, self.current = self.current, policy
        if self._on_swap is not None:
            self._on_swap(policy)
        self.notify()

    def notify(self) -> None:
        """Something a watcher receives changed (the policy, or settings sent with it)."""
        self.generation += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self, seen: int) -> int:
        """Wait until `generation` differs from `seen`; returns the new generation."""
        while self.generation == seen:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return self.generation

    async def watch(self, path: Path, interval_s: float) -> None:
        """Reload `path` whenever the file is replaced or rewritten; runs until cancelled.

        Survives any file: what cannot be read or loaded is logged (once per change of the
        file) and the next change is tried."""
        last = _file_key(path)
        while True:
            await asyncio.sleep(interval_s)
            key = _file_key(path)
            if key is None or key == last:
                continue
            last = key
            log.info("policy file %s changed; reloading", path)
            try:
                await self.load_path(path)
            except SwapRefused as e:
                log.warning("watch: keeping version %d: %s", self.current.version, e.message)
            except Exception:  # a bug must not stop the watching silently
                log.exception(
                    "watch: keeping version %d: loading %s failed", self.current.version, path
                )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _file_key(path: Path) -> tuple[int, int, int] | str | None:
    """What identifies the file's content: inode, mtime and size; the error when it cannot be
    examined (a symlink loop, no permission), so that it is reported once; None while it is
    missing (mid-replace: wait for the new file to appear)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return str(e)
    return st.st_ino, st.st_mtime_ns, st.st_size
