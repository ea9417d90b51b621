"""`AsyncClient`: `Client` for asyncio apps, the same frames and errors over asyncio unix streams.

    async with AsyncClient() as agent:
        result = await agent.infer("digits", x, deadline_ms=20)

Theory: coroutines that infer at once each need a connection of their own (a connection carries one request at a
time), so the client keeps a small pool: an idle connection is reused, a new one opened when all are busy, up to
`max_connections` (then callers wait their turn). `timeout_s` bounds each whole call; a call that times out or
breaks mid-reply closes its connection rather than return it, so no late reply answers another request. As in
`Client`, a request that finds a pooled connection closed with no byte of a reply goes once more on a fresh
connection (the agent's idle close).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from edgefleet.common.oip_frames import HEAD, FrameError, make_frame, parse_head
from edgefleet.sdk.client import MAX_REPLY_BYTES, Result, find_socket, request_parts, result_of
from edgefleet.sdk.errors import AgentUnavailable


class _Closed(Exception):
    """A pooled connection the agent had closed: no byte of a reply came (its idle close)."""


class AsyncClient:
    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout_s: float = 10.0,
                 data_dir: str | os.PathLike[str] | None = None, max_connections: int = 8) -> None:
        if not timeout_s > 0 or max_connections < 1:
            raise ValueError(f"timeout_s must be > 0 and max_connections >= 1, got {timeout_s!r}, "
                             f"{max_connections!r}")
        self.timeout_s = float(timeout_s)
        self._socket = socket
        self._data_dir = data_dir
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the app's event loop
        self.max_connections = max_connections

    @property
    def socket_path(self) -> str:
        return find_socket(self._socket, self._data_dir)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.socket_path
        try:
            return await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to the agent at {path}: {exc.strerror or exc}; is "
                                   "edgefleet-agent running, and this user in its group?") from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes,
                        reused: bool) -> Any:
        reader, writer = conn
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readexactly(HEAD.size)
        except asyncio.IncompleteReadError as exc:
            if reused and not exc.partial:
                raise _Closed() from None
            raise
        except (BrokenPipeError, ConnectionResetError):
            if reused:
                raise _Closed() from None
            raise
        kind, status, header_len, payload_len = parse_head(head, max_payload=MAX_REPLY_BYTES)
        body = bytearray(await reader.readexactly(header_len + payload_len))
        return make_frame(kind, status, body, header_len)

    async def infer(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray, deadline_ms: float | None = None,
                    tier: str = "realtime", *, version: str | None = None,
                    outputs: list[str] | None = None) -> Result:
        """As `Client.infer`, awaited."""
        data = b"".join(request_parts(model, inputs, deadline_ms, tier, version, outputs))
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        async with self._slots:
            for attempt in (0, 1):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._open()
                try:
                    frame = await asyncio.wait_for(self._exchange(conn, data, reused), self.timeout_s)
                except _Closed:
                    conn[1].close()
                    if attempt == 0:
                        continue
                    raise AgentUnavailable("the agent keeps closing connections; is it restarting? retry "
                                           "shortly") from None
                except asyncio.TimeoutError:
                    conn[1].close()
                    raise AgentUnavailable(f"the agent did not answer within {self.timeout_s:g} s (timeout_s); "
                                           "it may be overloaded: retry, or raise timeout_s") from None
                except (FrameError, asyncio.IncompleteReadError, OSError) as exc:
                    conn[1].close()
                    raise AgentUnavailable(f"the connection to the agent broke ({exc}); retry") from None
                self._idle.append(conn)
                return result_of(frame)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient"]
