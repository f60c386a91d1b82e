"""A backend that speaks HTTPS: python tls_backend.py http|ws PORT CERT KEY [CLIENT_CA].

``http`` serves echo.py's routes, ``ws`` ws_echo.py's, both over TLS with CERT and KEY (``http``
also on a unix socket: ``unix:PATH`` for PORT). With
CLIENT_CA, a client certificate signed by it is required. A connection whose TLS handshake
fails is a line ``tls failed: REASON`` and the server goes on.
"""

from __future__ import annotations

import os
import socket
import socketserver
import ssl
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import echo  # noqa: E402
import trio  # noqa: E402
import trio_websocket  # noqa: E402
import ws_echo  # noqa: E402


def context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, address = self.socket.accept()
        sock.settimeout(10)
        try:
            wrapped = self.tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            print(f"tls failed: {exc}", flush=True)
            sock.close()
            raise
        wrapped.settimeout(None)
        return wrapped, address


class UnixTLSServer(TLSServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: a unix address has no host

    def get_request(self):  # type: ignore[no-untyped-def]
        request, _ = super().get_request()
        return request, ("127.0.0.1", 0)


def serve_http(where: str, ctx: ssl.SSLContext) -> None:
    if where.startswith("unix:"):
        path = where[len("unix:") :]
        if os.path.exists(path):
            os.unlink(path)
        server: TLSServer = UnixTLSServer(path, echo.Handler)
    else:
        server = TLSServer(("127.0.0.1", int(where)), echo.Handler)
    server.tls = ctx
    print("tls http backend listening", flush=True)
    server.serve_forever()


async def serve_ws(port: int, ctx: ssl.SSLContext) -> None:
    async def connection(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            print(f"tls failed: {exc.__cause__}", flush=True)
            await trio.aclose_forcefully(stream)
            return
        try:
            async with tls, trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(
                    nursery, tls, max_message_size=ws_echo.MAX_MESSAGE, receive_buffer_size=None
                )
                await ws_echo.handle(request, ws_echo._printed)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, listeners)
        print("tls ws backend listening", flush=True)


def main() -> None:
    kind, where, cert, key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = context(cert, key, sys.argv[5] if len(sys.argv) > 5 else None)
    if kind == "http":
        serve_http(where, ctx)
    else:
        trio.run(serve_ws, int(where), ctx)


if __name__ == "__main__":
    main()
