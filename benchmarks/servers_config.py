# The one config file every proxy target loads: trioproxy with --config, and
# jupyter-server-proxy inside `jupyter server --config`. Only options both understand.
#
# The benchmark runner sets, per target launch:
#   TRIOPROXY_BENCH_PYTHON       the interpreter that runs backend.py (the same for every target)
#   TRIOPROXY_BENCH_DIR          a scratch directory: listen.log (backends), crash.log (crash loop)
#   TRIOPROXY_BENCH_COLD_COPIES  how many lazily started copies of each cold-start server
import os
import sys

c = get_config()  # noqa: F821  (provided by the traitlets config loader)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = os.environ.get("TRIOPROXY_BENCH_PYTHON") or sys.executable
BACKEND = os.path.join(HERE, "backend.py")
COPIES = int(os.environ.get("TRIOPROXY_BENCH_COLD_COPIES", "1"))


def backend(name, sleep=0.0):
    return {
        "command": [PYTHON, BACKEND, "{port}", "--sleep", str(sleep), "--name", name],
        "timeout": 30,
        "launcher_entry": {"enabled": False},
    }


servers = {"bench": backend("bench")}
# cold0_N, cold500_N, cold2000_N: backends that sleep 0, 0.5 and 2 s before listening.
for millis in (0, 500, 2000):
    for copy in range(1, COPIES + 1):
        name = f"cold{millis}_{copy}"
        servers[name] = backend(name, millis / 1000)
# A server whose command exits at once with an error, noting each spawn.
servers["crash"] = {
    "command": ["/bin/bash", "-c", 'echo "$EPOCHREALTIME" >> "$TRIOPROXY_BENCH_DIR/crash.log"; exit 1'],
    "timeout": 10,
    "launcher_entry": {"enabled": False},
}
c.ServerProxy.servers = servers
