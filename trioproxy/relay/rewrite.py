"""``rewrite_response``: let configured callables change a buffered response.

Each callable gets, by the names it asks for, ``response`` (a :class:`RewritableResponse` to
change in place), ``orig_response`` (the response as the backend sent it), ``request``,
``host``, ``port`` and ``path``, as in jupyter-server-proxy. They run in order, each seeing
what the one before it left.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..templating import call_with_asked_args
from .headers import Headers as HeaderList


class HeaderMap:
    """Case-insensitive headers that keep repeats (Set-Cookie) and their order."""

    def __init__(self, items: Sequence[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = list(items)

    @classmethod
    def from_raw(cls, raw: HeaderList) -> HeaderMap:
        return cls([(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw])

    def raw(self) -> HeaderList:
        return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in self._items]

    def get_list(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_list(name)
        return ",".join(values) if values else default

    def add(self, name: str, value: str) -> None:
        self._items.append((name, str(value)))

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: str) -> None:
        key = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]
        self._items.append((name, str(value)))

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        if not any(n.lower() == key for n, _ in self._items):
            raise KeyError(name)
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        seen: list[str] = []
        for n, _ in self._items:
            if n.lower() not in (s.lower() for s in seen):
                seen.append(n)
        return iter(seen)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def copy(self) -> HeaderMap:
        return HeaderMap(self._items)

    def __repr__(self) -> str:
        return f"HeaderMap({self._items!r})"


@dataclass
class RewritableResponse:
    """A response a rewrite callable may change: code, reason, headers and body."""

    code: int
    headers: HeaderMap
    body: bytes
    reason: str = ""

    def __setattr__(self, name: str, value: Any) -> None:
        # Changing the code resets a reason that was only the old code's standard phrase.
        if name == "code" and "code" in self.__dict__ and self.reason == _phrase(self.code):
            object.__setattr__(self, "reason", _phrase(value))
        object.__setattr__(self, name, value)


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


@dataclass
class RelayedRequest:
    """What rewrite callables see of the client's request."""

    method: str
    uri: str
    path: str
    query: str
    headers: HeaderMap
    host: str
    remote_ip: str | None
    protocol: str = "http"
    arguments: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RewriteContext:
    request: RelayedRequest
    host: str
    port: int | None
    path: str


def apply_rewrites(
    rewrites: Sequence[Callable[..., Any]],
    context: RewriteContext,
    status: int,
    reason: bytes,
    headers: HeaderList,
    body: bytes,
) -> tuple[int, HeaderList, bytes]:
    """Run the chain; return the final status, headers (with a fresh Content-Length) and body."""
    original = RewritableResponse(
        code=status,
        headers=HeaderMap.from_raw(headers),
        body=body,
        reason=reason.decode("latin-1") or _phrase(status),
    )
    response = copy.copy(original)
    response.headers = original.headers.copy()
    for rewrite in rewrites:
        call_with_asked_args(
            rewrite,
            {
                "response": response,
                "orig_response": original,
                "request": context.request,
                "host": context.host,
                "port": context.port,
                "path": context.path,
            },
        )
    body_out = response.body if isinstance(response.body, bytes) else str(response.body).encode()
    raw = [(n, v) for n, v in response.headers.raw() if n != b"content-length"]
    raw.append((b"content-length", str(len(body_out)).encode()))
    return int(response.code), raw, body_out
