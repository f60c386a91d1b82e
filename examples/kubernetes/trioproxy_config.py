"""trioproxy's servers in the example single-user image (examples/kubernetes/Dockerfile).

Every user's pod runs one trioproxy with these servers, started on first use under
/user/<name>/<server>/ and stopped after an hour without traffic.
"""

c = get_config()  # noqa: F821 (traitlets' config loader provides it)

c.ServerProxy.servers = {
    # The user's home directory, as files.
    "files": {
        "command": ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", "/home/jovyan"],
        "launcher_entry": {"title": "Files"},
        "idle_timeout": 3600,
    },
    # A small app of your own: replace with yours (RStudio, code-server, Streamlit, ...).
    "hello": {
        "command": ["python3", "/opt/apps/hello.py", "{port}"],
        "launcher_entry": {"title": "Hello"},
        "health_check": {"path": "/", "interval": 30, "timeout": 5, "failures": 3},
        "idle_timeout": 3600,
        # KubeSpawner gives the pod delete_grace_period seconds to stop (README): keep
        # graceful_timeout + the longest stop_timeout below it.
        "stop_timeout": 3,
    },
}
# Requests under way get this long when the pod is stopped (SIGTERM).
c.TrioProxy.graceful_timeout = 5
