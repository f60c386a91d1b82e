# The one server both single-user servers of the scale benchmark (hub_scale.py) serve:
# trioproxy --config and jupyterhub-singleuser --config (jupyter-server-proxy) load this file.
import os
import sys

c = get_config()  # noqa: F821  (provided by the traitlets config loader)

PYTHON = os.environ.get("TRIOPROXY_BENCH_PYTHON") or sys.executable
BACKEND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend.py")

c.ServerProxy.servers = {
    "app": {"command": [PYTHON, BACKEND, "{port}", "--name", "app"], "timeout": 120, "launcher_entry": {"enabled": False}},
}
