"""A backend that deadlocks on demand: python hangs.py PORT TRIGGER [--stop-listening].

Answers every request with 200 (``/health`` too), until a request finds the file TRIGGER:
it removes the file (so that the process started to replace this one is healthy) and from
then on every request hangs forever, or, with --stop-listening, the listening socket is
closed while the process lives on.
"""

import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, trigger = int(sys.argv[1]), sys.argv[2]
stop_listening = "--stop-listening" in sys.argv
hung = threading.Event()
never = threading.Event()
checking = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_one(self):
        with checking:  # one thread at a time: a request must not slip past a hang under way
            if os.path.exists(trigger):
                os.unlink(trigger)
                print(f"pid {os.getpid()}: hanging", flush=True)
                hung.set()
                if stop_listening:
                    threading.Thread(target=server.shutdown).start()
        if hung.is_set() and not stop_listening:
            never.wait()
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = f"pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = handle_one


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print("hangs backend listening", flush=True)
server.serve_forever()
server.server_close()
print("stopped listening", flush=True)
never.wait()
