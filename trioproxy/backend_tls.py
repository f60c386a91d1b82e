"""Backends that speak HTTPS: the ``backend_tls`` option and the TLS client side of a backend.

``backend_tls: True`` (or a dict) makes every connection trioproxy opens to that server a TLS
connection: HTTP requests, WebSockets on both paths, and readiness and health checks that
fetch a path. ``verify`` (on by default) checks the backend's certificate against ``ca_file``
(else the system's CAs) and the name trioproxy connects to (``127.0.0.1``, ``localhost`` for a
unix socket, or ``hostname``); ``client_cert`` / ``client_key`` present a client certificate.
Under JupyterHub with ``internal_ssl``, the Hub gives its servers a certificate, a key and the
CA of its internal network (``JUPYTERHUB_SSL_CERTFILE``, ``_KEYFILE``, ``_CLIENT_CA``): those are
the defaults, so ``backend_tls: True`` is enough for an app started with them.

:func:`parse` is the option's rules (it also loads the files, so a missing or broken one is a
load-time error naming it); :meth:`BackendTLS.wrap` does the handshake, within the caller's
connect timeout, and turns a TLS failure into :class:`TLSFailure`, an ``OSError`` whose message
names TLS, which every connecting caller already reports as a 502.
"""

from __future__ import annotations

import os
import ssl
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

OPTIONS = ("verify", "ca_file", "client_cert", "client_key", "hostname")
# What JupyterHub's internal_ssl gives every server it spawns (jupyterhub.spawner: the
# certificate and key of this server, and the CA bundle of the internal network).
HUB_DEFAULTS = {
    "ca_file": "JUPYTERHUB_SSL_CLIENT_CA",
    "client_cert": "JUPYTERHUB_SSL_CERTFILE",
    "client_key": "JUPYTERHUB_SSL_KEYFILE",
}


class TLSFailure(OSError):
    """A TLS handshake with a backend that failed; the message says why, naming TLS."""


@dataclass(frozen=True)
class BackendTLS:
    """How to speak TLS to one server's backend."""

    verify: bool = True
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    hostname: str = ""  # the name to check and send (SNI); "" for the address connected to
    context: ssl.SSLContext = field(default_factory=ssl.create_default_context, compare=False, hash=False, repr=False)

    def server_name(self, host: str | None) -> str:
        return self.hostname or host or "localhost"

    async def wrap(self, stream: trio.SocketStream, host: str | None, where: str) -> trio.SSLStream[trio.SocketStream]:
        """``stream`` after a TLS handshake; raises :class:`TLSFailure` (``stream`` closed).

        No timeout of its own: the caller's connect timeout bounds it.
        """
        tls = trio.SSLStream(stream, self.context, server_hostname=self.server_name(host), https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise TLSFailure(handshake_failure(exc.__cause__, where)) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls

    def describe(self) -> dict[str, Any]:
        """What the API shows (file paths, never their content)."""
        return {
            "verify": self.verify,
            "ca_file": self.ca_file or None,
            "client_cert": self.client_cert or None,
            "client_key": self.client_key or None,
            "hostname": self.hostname or None,
        }


def parse(value: Any, environ: Mapping[str, str] | None = None) -> BackendTLS | None:
    """The TLS a ``backend_tls`` value asks for (None: plain TCP), its files loaded.

    Raises ValueError with one line naming what is wrong. ``environ`` (``os.environ`` by
    default) gives the JupyterHub internal-SSL defaults.
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected true, false or a dict with {', '.join(OPTIONS)}, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key not in OPTIONS)
    if unknown:
        raise ValueError(f"unknown backend_tls option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
    environ = os.environ if environ is None else environ
    verify = value.get("verify", True)
    if not isinstance(verify, bool):
        raise ValueError(f"backend_tls verify must be true or false, got {verify!r}")
    files: dict[str, str] = {}
    for option in ("ca_file", "client_cert", "client_key"):
        # An option given as "" or None turns the Hub's default off (a client_cert turned off
        # takes the Hub's key with it).
        hub_default = environ.get(HUB_DEFAULTS[option], "")
        if option == "client_key" and "client_cert" in value:
            hub_default = ""
        given = value[option] if option in value else hub_default
        if given is None:
            given = ""
        if not isinstance(given, str) or "\0" in given:
            raise ValueError(f"backend_tls {option} must be a file path, got {given!r}")
        files[option] = given
    if files["client_key"] and not files["client_cert"]:
        raise ValueError("backend_tls client_key needs client_cert as well")
    hostname = value.get("hostname", "")
    if not isinstance(hostname, str) or any(not 0x21 <= ord(char) < 0x7F for char in hostname):
        raise ValueError(f"backend_tls hostname must be a host name, got {hostname!r}")
    context = _context(verify, **files)
    return BackendTLS(verify=verify, hostname=hostname, context=context, **files)


def _context(verify: bool, ca_file: str, client_cert: str, client_key: str) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except FileNotFoundError:
        raise ValueError(f"backend_tls ca_file not found: {ca_file}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"backend_tls ca_file {ca_file}: not a CA bundle ({_ssl_reason(exc)})") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert:
        for option, path in (("client_cert", client_cert), ("client_key", client_key)):
            if path and not os.path.isfile(path):
                raise ValueError(f"backend_tls {option} not found: {path}")
        try:
            context.load_cert_chain(client_cert, client_key or None)
        except (ssl.SSLError, OSError) as exc:
            key = f" with {client_key}" if client_key else ""
            raise ValueError(f"backend_tls cannot use client_cert {client_cert}{key}: {_ssl_reason(exc)}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


_parsed: weakref.WeakKeyDictionary[Any, BackendTLS | None] = weakref.WeakKeyDictionary()


def backend_tls(process: Any) -> BackendTLS | None:
    """The parsed ``backend_tls`` of a ``ServerProcess`` (its context made once). Raises
    ValueError as :func:`parse` (the load-time check has seen the same value)."""
    if process in _parsed:
        return _parsed[process]
    tls = parse(getattr(process, "backend_tls", None))
    _parsed[process] = tls
    return tls


def server_tls(process: Any) -> BackendTLS | None:
    """:func:`backend_tls`, or None for a server whose value failed its check (it only runs
    as a stand-in that answers 503)."""
    try:
        return backend_tls(process)
    except ValueError:
        return None


def handshake_failure(cause: BaseException | None, where: str) -> str:
    """Why a TLS handshake with ``where`` failed, in one line naming TLS."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or _ssl_reason(cause)
        return f"TLS verification of {where} failed: {why} (backend_tls: set ca_file, or verify: false)"
    if isinstance(cause, ssl.SSLError):
        reason = _ssl_reason(cause)
        hint = " (is the backend speaking TLS? backend_tls is on)" if "WRONG_VERSION_NUMBER" in str(cause) else ""
        return f"TLS handshake with {where} failed: {reason}{hint}"
    if cause is None:
        return f"TLS handshake with {where} failed: the backend closed the connection"
    return f"TLS handshake with {where} failed: {type(cause).__name__}: {cause}"


def broken_by_tls(exc: BaseException) -> str | None:
    """The TLS alert behind a broken backend connection, if TLS broke it (a backend that
    wants a client certificate says so on the first read under TLS 1.3, not in the handshake)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {_ssl_reason(cause)}"
    return None


def refused_after_handshake(stream: trio.abc.Stream) -> str:
    """What to add when a fresh backend connection breaks before taking a request: over TLS
    that is, most likely, a backend refusing the client certificate (or its absence), which
    TLS 1.3 says after the handshake and a closing backend's reset can swallow."""
    if isinstance(stream, trio.SSLStream):
        return " right after its TLS handshake: does it require a client certificate? (backend_tls client_cert)"
    return ""


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason).replace("_", " ").lower()
    return getattr(exc, "strerror", None) or str(exc)
