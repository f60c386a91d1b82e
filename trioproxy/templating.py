"""Template substitution and calling user callables with the arguments they name.

jupyter-server-proxy lets ``command``, ``environment``, ``mappath`` and ``rewrite_response`` be
callables; each is called with just the arguments its signature names, chosen from what the call
site has on offer. Strings get ``{port}``, ``{unix_socket}`` and ``{base_url}`` by ``str.format``,
so ``{{`` and ``}}`` stand for literal braces, as there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


class TemplateError(ValueError):
    """A template or callable that cannot be expanded; the message says which and why."""


def call_with_asked_args(func: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """Call ``func`` with the keyword arguments it names, taken from ``available``."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func()
    kwargs: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in available:
            kwargs[name] = available[name]
        elif parameter.default is parameter.empty:
            offered = ", ".join(sorted(available))
            raise TemplateError(
                f"{getattr(func, '__name__', func)!r} asks for {name!r}; available: {offered}"
            )
    return func(**kwargs)


def expand(template: str, variables: Mapping[str, Any]) -> str:
    try:
        return template.format_map(variables)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + name + "}" for name in sorted(variables))
        raise TemplateError(f"cannot expand {template!r} ({exc}); known: {known}") from None


def expand_list(value: Any, variables: Mapping[str, Any]) -> list[str]:
    if callable(value):
        value = call_with_asked_args(value, variables)
    if not isinstance(value, (list, tuple)):
        raise TemplateError(f"expected a list of strings, got {type(value).__name__}")
    return [expand(str(item), variables) for item in value]


def expand_dict(value: Any, variables: Mapping[str, Any]) -> dict[str, str]:
    if callable(value):
        value = call_with_asked_args(value, variables)
    if not isinstance(value, Mapping):
        raise TemplateError(f"expected a dict of strings, got {type(value).__name__}")
    return {str(key): expand(str(item), variables) for key, item in value.items()}


def expand_environment(value: Any, variables: Mapping[str, Any]) -> dict[str, str | None]:
    """:func:`expand_dict` for an ``environment``, where a None value stays None: the variable
    is left unset (jupyter-pgadmin-proxy's callable returns ``os.environ.get("PGHOST")``)."""
    if callable(value):
        value = call_with_asked_args(value, variables)
    if not isinstance(value, Mapping):
        raise TemplateError(f"expected a dict of strings, got {type(value).__name__}")
    return {str(key): None if item is None else expand(str(item), variables) for key, item in value.items()}
