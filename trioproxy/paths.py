"""Where each server is served: its URL path (``path``, else its name) and its ``aliases``.

Pure. A path is one or more segments below the base URL (``tools/refine``). Segments are
written as they go on the wire, from a small set of characters that need no escaping
(letters, digits and ``-._~!$&'()*+,;=:@``): no percent-encoding, no ``.`` or ``..``, no empty
segment, so that what a path means cannot depend on how a client or another proxy decodes
or normalises it. A request matches a path when its first segments, each percent-decoded,
equal the path's: ``tools%2Frefine`` is one segment and matches nothing.

Paths must not overlap: across all servers, no path or alias may equal another or be a
prefix of another by whole segments (``tools`` and ``tools/refine`` clash; ``tool`` and
``tools`` do not). Nesting is refused rather than decided by the longest match because the
outer server would silently lose every URL under the inner one (and a reload adding the
inner one would take them away from a running app). Nor may a path begin with trioproxy's
own routes (``proxy``, ``server-proxy``, ``login``, ``logout``, ``oauth_callback``) or be
``api``; routing checks those first anyway, so they can never be shadowed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from .options import OptionError
from .routing import OWN_PATHS, OWN_SEGMENTS

log = logging.getLogger("trioproxy.paths")

# First segments a path may not take: trioproxy's own routes and proxy/<port>.
RESERVED_SEGMENTS = OWN_SEGMENTS | {"proxy"}
_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")
_ALLOWED = "letters, digits and -._~!$&'()*+,;=:@"

Segments = tuple[str, ...]


def parse_path(option: str, value: Any) -> Segments:
    """``value`` (``"tools/refine"``; one leading and one trailing ``/`` are allowed) as its
    segments; an OptionError naming ``option`` when it is not a usable path."""
    if not isinstance(value, str):
        raise OptionError(option, f"{value!r} is not a string")
    text = value[1:] if value.startswith("/") else value
    text = text[:-1] if text.endswith("/") else text
    if not text:
        raise OptionError(option, f"{value!r} is empty; a path needs at least one segment")
    segments = tuple(text.split("/"))
    for segment in segments:
        if not segment:
            raise OptionError(option, f"{value!r} has an empty segment ('//')")
        if segment in (".", ".."):
            raise OptionError(option, f"{value!r} has a {segment!r} segment")
        if "%" in segment:
            raise OptionError(option, f"{value!r} is percent-encoded; write the characters themselves ({_ALLOWED})")
        if _SEGMENT.fullmatch(segment) is None:
            bad = next(char for char in segment if _SEGMENT.fullmatch(char) is None)
            raise OptionError(option, f"{value!r} contains {bad!r}; a path may hold {_ALLOWED}")
    if segments[0] in RESERVED_SEGMENTS:
        raise OptionError(option, f"{value!r} is under trioproxy's own route {segments[0] + '/'!r}")
    if len(segments) == 1 and segments[0] in OWN_PATHS:
        raise OptionError(option, f"{value!r} is trioproxy's own route (its version)")
    return segments


def check_paths(process: Any) -> None:
    """The rules for one server's ``path`` and ``aliases`` on their own (see
    :func:`find_clashes` for the rules between servers). Raises OptionError."""
    if process.path:
        parse_path("path", process.path)
    for alias in process.aliases:
        parse_path("aliases", alias)
    entries = _entries(process)
    for index, entry in enumerate(entries):
        for other in entries[:index]:
            if overlaps(entry.segments, other.segments):
                raise OptionError("aliases", f"{entry.describe()} overlaps {other.describe()} of the same server")


@dataclass(frozen=True)
class Entry:
    """One URL path a server answers at: its path (``alias`` false) or an alias."""

    name: str
    segments: Segments
    alias: bool = False

    def describe(self) -> str:
        return f"{'alias' if self.alias else 'path'} {'/'.join(self.segments)!r}"


def overlaps(one: Segments, other: Segments) -> bool:
    """Whether one is the other or a prefix of it, by whole segments."""
    shorter = min(len(one), len(other))
    return one[:shorter] == other[:shorter]


def server_path(process: Any) -> str:
    """The server's path below the base URL as it appears in URLs, without slashes: its
    ``path``, else its name (percent-encoded, as a name may hold any character but '/')."""
    if process.path:
        return "/".join(parse_path("path", process.path))
    return quote(process.name, safe="")


def _entries(process: Any) -> list[Entry]:
    if process.root:  # every path no other server takes is its own, its name included
        return []
    main = parse_path("path", process.path) if process.path else (process.name,)
    return [Entry(process.name, main)] + [Entry(process.name, parse_path("aliases", a), True) for a in process.aliases]


def _clash(entries: list[Entry], taken: Iterable[Entry]) -> str | None:
    for entry in entries:
        for other in taken:
            if overlaps(entry.segments, other.segments):
                relation = "is the same as" if entry.segments == other.segments else "overlaps"
                return f"its {entry.describe()} {relation} the {other.describe()} of server {other.name!r}"
    return None


def find_clashes(processes: Iterable[Any]) -> dict[str, str]:
    """Which servers cannot have their paths, and why: ``processes`` in order of precedence
    (each keeps its paths unless an earlier one took them). Servers not ``routed`` take none."""
    taken: list[Entry] = []
    refused: dict[str, str] = {}
    for process in processes:
        if not process.routed:
            continue
        try:
            entries = _entries(process)
        except OptionError as exc:  # checked at load; a stand-in never gets here
            refused[process.name] = str(exc)
            continue
        reason = _clash(entries, taken)
        if reason is not None:
            refused[process.name] = reason
        else:
            taken.extend(entries)
    return refused


def clash_with(process: Any, others: Iterable[Any]) -> str | None:
    """Why ``process`` cannot have its paths beside ``others`` (servers of other names), or None."""
    taken = [entry for other in others if other.routed and other.name != process.name for entry in _safe_entries(other)]
    return _clash(_safe_entries(process), taken)


def name_clash(name: str, others: Iterable[Any]) -> str | None:
    """Why a server served at its ``name`` (no path of its own) cannot be beside ``others``, or None."""
    taken = [entry for other in others if other.routed and other.name != name for entry in _safe_entries(other)]
    return _clash([Entry(name, (name,))], taken)


def _safe_entries(process: Any) -> list[Entry]:
    try:
        return _entries(process)
    except OptionError:
        return []


@dataclass(frozen=True)
class Match:
    """What a request path below the base URL matched: ``rest`` is the raw remainder, empty or
    starting with '/'; ``prefix`` the server's public path below the base URL (no slashes)."""

    name: str
    alias: bool
    rest: bytes
    prefix: str


class PathTable:
    """The paths of a set of servers, for routing (:func:`trioproxy.routing.resolve`)."""

    def __init__(self, processes: Iterable[Any]) -> None:
        self._entries: dict[Segments, tuple[Entry, str]] = {}
        self._names: set[str] = set()
        self.depth = 1
        for process in processes:
            if not process.routed:
                continue
            try:
                entries, prefix = _entries(process), server_path(process)
            except OptionError as exc:  # checked at load: only a server built without the checks
                log.error("server %r gets no route: %s", process.name, exc)
                continue
            self._names.add(process.name)
            for entry in entries:
                # During a reload two servers may briefly hold one path: the first keeps it.
                self._entries.setdefault(entry.segments, (entry, prefix))
                self.depth = max(self.depth, len(entry.segments))

    @classmethod
    def of(cls, supervisors: Mapping[str, Any]) -> PathTable:
        return cls(supervisor.process for supervisor in supervisors.values())

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def match(self, rest: bytes) -> Match | None:
        """The server whose path or alias begins ``rest`` (the raw path below the base URL)."""
        parts = rest.split(b"/", self.depth)
        decoded = [unquote(part.decode("latin-1")) for part in parts[: self.depth]]
        for count in range(min(self.depth, len(decoded)), 0, -1):
            found = self._entries.get(tuple(decoded[:count]))
            if found is not None:
                entry, prefix = found
                consumed = sum(len(part) for part in parts[:count]) + count - 1
                return Match(entry.name, entry.alias, rest[consumed:], prefix)
        return None
