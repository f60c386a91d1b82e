"""Message framing rules for the relay (RFC 9112 §6): pure functions, no I/O.

A proxy that passes on a request framed two ways at once lets the client and the backend
disagree on where it ends; the rest is read as a second request nobody authenticated
("request smuggling"). So an ambiguous request is refused, and the backend always gets a body
framed by what the relay itself writes: the client's own framing headers never pass.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Headers the relay writes itself for the body it sends; the client's never reach the backend.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})

# Methods whose empty body is still announced (Content-Length: 0), as clients do.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class FramingError(Exception):
    """A request whose body framing is ambiguous or unsupported: refused with 400."""


def transfer_codings(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The transfer codings of every Transfer-Encoding field, in order, lower case."""
    return [
        coding.strip().lower()
        for name, value in headers
        if name == b"transfer-encoding"
        for coding in value.split(b",")
        if coding.strip()
    ]


def declared_length(headers: Headers) -> int | None:
    """The request body's length as the client framed it: None for chunked or no body.

    Raises FramingError for both Transfer-Encoding and Content-Length, a Transfer-Encoding
    other than ``chunked`` alone, or Content-Length values that are not one number.
    """
    has_te = any(name == b"transfer-encoding" for name, _ in headers)
    lengths = {
        part.strip()
        for name, value in headers
        if name == b"content-length"
        for part in value.split(b",")
    }
    if has_te and lengths:
        raise FramingError("the request has both Transfer-Encoding and Content-Length")
    if has_te:
        if transfer_codings(headers) != [b"chunked"]:
            raise FramingError("the only transfer coding accepted in a request is 'chunked' alone")
        return None
    if not lengths:
        return None
    if len(lengths) > 1:
        raise FramingError("the request has conflicting Content-Length values")
    (length,) = lengths
    if not length.isdigit() or len(length) > 18:
        raise FramingError("the request's Content-Length is not a number")
    return int(length)


def body_framing(
    method: bytes, declared: int | None, first_part: bytes, more_body: bool
) -> tuple[tuple[bytes, bytes] | None, bool]:
    """The framing header the backend gets, and whether the body goes chunked.

    ``declared`` is the client's Content-Length (checked by :func:`declared_length`); without
    one, a body that is all there is sent with its length, and one still coming is chunked.
    """
    if declared is not None:
        return (b"content-length", b"%d" % declared), False
    if more_body:
        return (b"transfer-encoding", b"chunked"), True
    if first_part or method in _BODY_METHODS:
        return (b"content-length", b"%d" % len(first_part)), False
    return None, False


def response_framing_error(headers: Headers) -> str | None:
    """Why a backend's response cannot be relayed as framed, or None.

    A transfer coding other than ``chunked`` would reach the client decoded of its chunks but
    still coded (say, gzip) with nothing saying so.
    """
    codings = transfer_codings(headers)
    if codings and codings != [b"chunked"]:
        return f"the backend answered with an unsupported transfer coding ({b', '.join(codings).decode('latin-1')})"
    return None
