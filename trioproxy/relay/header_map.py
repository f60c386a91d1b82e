"""Headers as callables written for jupyter-server-proxy expect them: Tornado's ``HTTPHeaders``.

Packages pass ``rewrite_response``, ``update_last_activity`` and ``mappath`` callables that
were written against the Tornado objects jupyter-server-proxy hands them. What they use of
``tornado.httputil.HTTPHeaders`` (read in their source: jupyter-rsession-proxy iterates
``get_all()`` and compares ``name == "Location"``; others use ``get_list``, ``add``, item
access, ``dict(headers)``, ``in``):

- names are case-insensitive and come back in canonical case (``Content-Type``), whatever
  case the backend sent;
- a name may repeat (``Set-Cookie``): ``add`` appends, ``get_list`` and ``get_all`` give every
  value, ``headers[name]`` and ``get`` give the values joined with ``,``, and ``headers[name] =``
  replaces them all;
- it is a mutable mapping of the distinct names (``keys``, ``values``, ``items``, ``pop``,
  ``update``, ``setdefault``, ``copy``, ``len``, iteration), as Tornado's is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

HeaderList = list[tuple[bytes, bytes]]


def canonical(name: str) -> str:
    """``content-type`` → ``Content-Type``, as Tornado normalises header names."""
    return "-".join(word.capitalize() for word in name.split("-"))


class HeaderMap(MutableMapping[str, str]):
    """Case-insensitive headers that keep repeats; see the module docstring.

    As in Tornado, values are kept by name, names in the order they first came: iterating
    ``get_all()`` gives a name's values together, and setting a name keeps its place.
    """

    def __init__(self, *args: Any, **kwargs: str) -> None:
        self._values: dict[str, list[str]] = {}
        if len(args) == 1 and not kwargs and isinstance(args[0], HeaderMap):
            self._values = {name: list(values) for name, values in args[0]._values.items()}
        elif len(args) == 1 and not kwargs and isinstance(args[0], list | tuple):
            for name, value in args[0]:
                self.add(name, value)
        else:
            self.update(*args, **kwargs)

    @classmethod
    def from_raw(cls, raw: HeaderList) -> HeaderMap:
        headers = cls()
        for name, value in raw:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        return headers

    def raw(self) -> HeaderList:
        """Every value, lower-case names, as bytes (what the relay sends on)."""
        return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in self.get_all()]

    # -- Tornado's own methods ----------------------------------------------------------------

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(canonical(name), []).append(str(value))

    def get_list(self, name: str) -> list[str]:
        return list(self._values.get(canonical(name), []))

    def get_all(self) -> Iterator[tuple[str, str]]:
        """Every (name, value), repeats included; safe to change the headers meanwhile."""
        return iter([(name, value) for name, values in self._values.items() for value in values])

    def parse_line(self, line: str) -> None:
        name, _, value = line.partition(":")
        self.add(name.strip(), value.strip())

    # -- the mapping ----------------------------------------------------------------------

    def __getitem__(self, name: str) -> str:
        return ",".join(self._values[canonical(name)])

    def __setitem__(self, name: str, value: str) -> None:
        self._values[canonical(name)] = [str(value)]

    def __delitem__(self, name: str) -> None:
        del self._values[canonical(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical(name) in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def copy(self) -> HeaderMap:
        return HeaderMap(self)

    __copy__ = copy

    def __eq__(self, other: object) -> bool:
        if isinstance(other, HeaderMap):
            return self._values == other._values
        if isinstance(other, Mapping):
            return dict(self.items()) == {canonical(k): v for k, v in other.items()}
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dict

    def __str__(self) -> str:
        return "".join(f"{n}: {v}\n" for n, v in self.get_all())  # as Tornado writes it

    def __repr__(self) -> str:
        return f"HeaderMap({list(self.get_all())!r})"


def headers_of(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> HeaderMap:
    """``value`` as a :class:`HeaderMap` (a callable may replace ``response.headers`` with a dict)."""
    return value if isinstance(value, HeaderMap) else HeaderMap(value)
