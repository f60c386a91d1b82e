"""JupyterHub mode: browsers log in through the Hub's OAuth, API clients use Hub tokens.

When JupyterHub spawns trioproxy (as a single-user server or a service), its environment
says where to listen and how to reach the Hub (:mod:`.settings`). :class:`HubAuth`
(:mod:`.authenticator`) then decides who a request is from, asking the Hub
(:mod:`.client`); browsers log in by the OAuth code flow (:mod:`.oauth`); while there is
traffic, the Hub is told (:mod:`.activity`), so that idle culling sees the server as used.
None of it depends on the web framework: :mod:`trioproxy.api` serves the login pages.
"""

from .authenticator import HubAuth as HubAuth
from .client import HubUnavailable as HubUnavailable
from .settings import HubSettings as HubSettings
from .settings import scopes_allow as scopes_allow

__all__ = ["HubAuth", "HubSettings", "HubUnavailable", "scopes_allow"]
