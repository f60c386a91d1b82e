"""The process that runs installed packages' Jupyter server extensions for trioproxy.

``python -m trioproxy.extension_host --port P --base-url B --auth-variable VAR MODULE...`` starts a
Jupyter Server on 127.0.0.1:P under the base URL B with exactly the server extensions named,
and nothing else: no configuration files are read (the user's ``c.ServerApp`` settings are for
their own Jupyter, not for this child), no other installed extension is found and loaded, no
runtime file announces it to ``jupyter server list``. trioproxy starts it as one of its
servers (``trioproxy.server_extensions``) and relays to it the paths the extensions serve.

It trusts one thing: the ``Authorization: token <t>`` header trioproxy adds to every request it
relays, ``t`` being read from the environment variable VAR (never the command line, which other
users can read). Cookies, ``?token=`` and every other credential are ignored, so a local user
who reaches the port directly gets 403, and trioproxy's own authentication (token, JupyterHub)
decides who gets in. An extension that fails to import or load ends the process with its
traceback (``reraise_server_extension_failures``), which trioproxy shows as the server's reason.

This module imports ``jupyter_server``, which trioproxy itself never needs: it runs only in the
child, and only when an installed package has an extension to serve.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
from typing import Any


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trioproxy.extension_host")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", default="/")
    parser.add_argument("--auth-variable", required=True, help="the variable holding the token trioproxy sends")
    parser.add_argument("modules", nargs="+", help="server extension modules to load")
    return parser.parse_args(argv)


def hub_template_vars(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Under JupyterHub, what jupyterhub-singleuser gives extensions' templates: the link back
    to the Hub's control panel (jupyter-remote-desktop-proxy's page shows it)."""
    if "JUPYTERHUB_API_TOKEN" not in environ or "JUPYTERHUB_BASE_URL" not in environ:
        return {}
    base = environ["JUPYTERHUB_BASE_URL"].rstrip("/")
    return {"hub_control_panel_url": f"{environ.get('JUPYTERHUB_HOST', '')}{base}/hub/home"}


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    token = os.environ.pop(args.auth_variable, "")
    if not token:
        sys.exit(f"trioproxy.extension_host: ${args.auth_variable} is empty; trioproxy passes the token there")
    try:
        from jupyter_server.auth.identity import IdentityProvider, User
        from jupyter_server.serverapp import ServerApp
        from traitlets import default
    except ImportError as exc:
        sys.exit(
            f"trioproxy.extension_host: cannot run server extensions {', '.join(args.modules)}: {exc} "
            "(install jupyter-server beside them: pip install jupyter-server)"
        )

    class TrioproxyIdentity(IdentityProvider):
        """A request is trioproxy's when it carries trioproxy's token header; nothing else counts."""

        @default("token")
        def _token_default(self) -> str:
            return token  # not "generated": Jupyter Server then prints no login URL banner

        def get_user(self, handler: Any) -> Any:
            scheme, _, value = handler.request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "token" and hmac.compare_digest(value.strip().encode(), token.encode()):
                return User(username="trioproxy")
            return None

        @property
        def auth_enabled(self) -> bool:
            return True

        @property
        def login_available(self) -> bool:
            return False

    class ExtensionHost(ServerApp):
        name = "trioproxy-extension-host"

        # Jupyter Server steps this process skips on purpose, each left empty:

        def load_config_file(self, *args: Any, **kwargs: Any) -> None:
            """The user's Jupyter configuration is not this process's."""

        def find_server_extensions(self) -> None:
            """Only the modules trioproxy named (``jpserver_extensions`` below)."""

        def write_server_info_file(self) -> None:
            """No runtime file: nothing but trioproxy is to find this server."""

        def write_browser_open_files(self) -> None:
            """No browser opens it: trioproxy's page links to it."""

    app = ExtensionHost()
    app.jpserver_extensions = dict.fromkeys(args.modules, True)
    app.jinja_template_vars = hub_template_vars(os.environ)
    app.identity_provider_class = TrioproxyIdentity
    app.initialize(
        argv=[
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={args.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={args.base_url}",
            "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",
            "--ServerApp.terminals_enabled=False",
            # Requests come from trioproxy only, which checks the client's origin itself.
            "--ServerApp.disable_check_xsrf=True",
            "--ServerApp.reraise_server_extension_failures=True",
        ]
    )
    app.start()


if __name__ == "__main__":
    main()
