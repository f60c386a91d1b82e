"""The ``X-JupyterHub-Version`` header every answer carries in JupyterHub mode.

The Hub reads it from the first answer of a server it spawned and logs "Single-user server
has no version header, which means it is likely < 0.8" when it is missing; a major version
unlike its own is logged as a warning too. jupyterhub-singleuser sends the version of the
jupyterhub package it runs from. trioproxy does the same when jupyterhub is installed beside
it (read from the package's metadata, without importing it); otherwise it sends the version
the Hub itself announces on its API, so that the Hub sees its own version and is satisfied.
"""

from __future__ import annotations

import importlib.metadata
import logging

from .client import HubClient, HubUnavailable

log = logging.getLogger("trioproxy.hub")

HEADER = b"x-jupyterhub-version"


def installed_version() -> str | None:
    """The version of the jupyterhub package installed beside trioproxy, if any."""
    try:
        return importlib.metadata.version("jupyterhub")
    except importlib.metadata.PackageNotFoundError:
        return None


async def announced_version(client: HubClient) -> str | None:
    """The version the Hub's API announces (its header, else ``{"version"}``), or None."""
    try:
        return await client.hub_version()
    except HubUnavailable as exc:
        log.warning("cannot ask the Hub for its version (answers go without X-JupyterHub-Version): %s", exc)
        return None


def is_token(value: str) -> bool:
    """Whether ``value`` can go in a header as it is (a version: digits, letters, ``.+-_``)."""
    return bool(value) and len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in ".+-_") for c in value)
