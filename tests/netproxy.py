"""`DelayProxy`: a real TCP proxy on localhost that holds every chunk for a while in each direction: the round trip
of a far cloud, for the offload tests and bench/offload_policy.py. It can also stall (`flowing.clear()`: bytes held,
nothing closed, a network that hangs: the keepalive tests) and cut (`cut_after` bytes from the server, then both
sides closed: a network that drops mid-download).

Each accepted connection opens its own upstream connection; an upstream that is down (refused) closes the client's
connection at once, as a dead cloud behind a load balancer would, and the proxy keeps accepting. `delay_s` is read
per chunk, so a test can make the link slow or fast while connections are open.
"""

from __future__ import annotations

import socket
import threading
import time


class DelayProxy:
    """Proxies 127.0.0.1:{port} to `upstream` ((host, port), or a port on 127.0.0.1), holding each client-to-server
    chunk `delay_s` and each server-to-client chunk `return_delay_s` (default 0: the whole round trip on the way in)."""

    def __init__(self, upstream: tuple[str, int] | int, delay_s: float = 0.0, *, return_delay_s: float = 0.0,
                 cut_after: int | None = None) -> None:
        self.upstream = ("127.0.0.1", upstream) if isinstance(upstream, int) else upstream
        self.delay_s, self.return_delay_s = delay_s, return_delay_s
        self.cut_after = cut_after  # bytes from the server after which every connection is cut (None: never)
        self.returned = 0  # bytes passed from the server so far
        self.flowing = threading.Event()  # cleared: every chunk waits, nothing is closed (a stalled network)
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.refused = 0  # connections whose upstream could not be reached
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="delay-proxy").start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self.refused += 1
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "delay_s"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "return_delay_s"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay_attr: str) -> None:
        try:
            back = delay_attr == "return_delay_s"  # from the server
            while chunk := src.recv(65536):
                delay = getattr(self, delay_attr)
                if delay:
                    time.sleep(delay)  # the emulated link's latency, not a synchronisation
                self.flowing.wait()
                if back and self.cut_after is not None:
                    with self._lock:
                        chunk = chunk[:max(0, self.cut_after - self.returned)]
                        self.returned += len(chunk)
                    dst.sendall(chunk)
                    if self.returned >= self.cut_after:
                        break  # cut now, not at the next chunk (the server may have nothing more to send)
                    continue
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.flowing.set()
        self._stop.set()
        self.listener.close()
        with self._lock:
            for s in self._socks:
                s.close()
