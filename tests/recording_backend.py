"""A backend that logs exactly what reached it, for the backend-client tests.

It runs in the test's own trio run on a real loopback socket and parses what arrives with h11,
as a strict HTTP/1.1 server would: a request smuggled inside another one's body shows up as a
request of its own. ``mode`` decides how it answers: ``answer`` (200, keep-alive), ``hang``
(reads the request, never answers), ``close`` (reads the request, then closes without
answering), ``stall`` (answers a head and a first chunk, then nothing), ``answer-once`` (answers a connection's first request; reads the next one and
closes without answering), or ``close-idle`` (answers, then closes the connection after ``idle_close`` s of
keep-alive idleness, as many servers do).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import h11
import trio


@dataclass
class Received:
    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]  # names as they arrived on the wire
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name), None)


@dataclass
class RecordingBackend:
    mode: str = "answer"
    idle_close: float = 0.2
    delay: float = 0.0  # before each answer
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)  # every byte received, per connection
    connections: int = 0  # accepted so far
    open: int = 0  # open now
    most_open: int = 0  # open at once, at the most
    errors: list[str] = field(default_factory=list)  # what h11 refused

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.serve_listeners, self._handle, listeners))
            task_status.started(self.port)

    def paths(self) -> list[str]:
        return [request.target for request in self.requests]

    async def _handle(self, stream: trio.SocketStream) -> None:
        number = self.connections
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.raw.append(b"")
        # h11 normalises header names to lower case; keep the raw names from the wire too.
        connection = h11.Connection(h11.SERVER)
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._serve_connection(number, stream, connection)
        except h11.RemoteProtocolError as exc:
            self.errors.append(str(exc))
        finally:
            self.open -= 1
            await stream.aclose()

    async def _read(self, number: int, stream: trio.SocketStream, connection: h11.Connection) -> h11.Event:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.mode == "close-idle" and connection.our_state is h11.IDLE:
                with trio.move_on_after(self.idle_close):
                    data = await stream.receive_some(65536)
                    self.raw[number] += data
                    connection.receive_data(data)
                    continue
                raise trio.ClosedResourceError  # idle too long: close, as a server's timer would
            data = await stream.receive_some(65536)
            self.raw[number] += data
            connection.receive_data(data)

    async def _serve_connection(self, number: int, stream: trio.SocketStream, connection: h11.Connection) -> None:
        number_on_connection = 0
        while True:
            event = await self._read(number, stream, connection)
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            body = b""
            while True:
                part = await self._read(number, stream, connection)
                if isinstance(part, h11.EndOfMessage):
                    break
                if isinstance(part, h11.ConnectionClosed):
                    return
                assert isinstance(part, h11.Data)
                body += part.data
            raw_names = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]
            self.requests.append(
                Received(number, event.method.decode(), event.target.decode("latin-1"), raw_names, body)
            )
            if self.mode == "stall":
                # The head and a first chunk, then nothing: an event stream with nothing to say.
                await stream.send_all(
                    connection.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
                    + connection.send(h11.Data(data=b"first"))
                )
                while await stream.receive_some(65536):
                    continue
                return
            if self.mode == "hang":
                while await stream.receive_some(65536):
                    continue  # never answer; notice when the proxy closes the connection
                return
            if self.mode == "close" or (self.mode == "answer-once" and number_on_connection > 0):
                return
            number_on_connection += 1
            await trio.sleep(self.delay)
            reply = f"ok {len(self.requests)}".encode()
            await stream.send_all(
                connection.send(
                    h11.Response(status_code=200, headers=[("content-length", str(len(reply)))])
                )
                + connection.send(h11.Data(data=reply))
                + connection.send(h11.EndOfMessage())
            )
            if connection.our_state is not h11.DONE:
                return
            connection.start_next_cycle()
