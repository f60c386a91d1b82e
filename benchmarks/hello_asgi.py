"""The small-request ceiling: a bare ASGI hello-world served by Hypercorn's trio worker.

    hypercorn -k trio -b 127.0.0.1:PORT hello_asgi:app      (run from benchmarks/)

It answers every request with the same 100-byte body as the backend's /small, with nothing in
between: no routing, no relay. trioproxy runs on the same server stack, so its small-request
rate is measured against this.
"""

BODY = b"x" * 99 + b"\n"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
BODY_MESSAGE = {"type": "http.response.body", "body": BODY, "more_body": False}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await send(START)
    await send(BODY_MESSAGE)
