"""Server templates: servers started on demand, one instance per set of declared arguments.

A template (``c.ServerProxy.templates = {name: {...}}``) holds a server's options plus
``params``, the arguments an instance is created with, and ``max_instances``. Each parameter
declares a type (``string``, ``path``, ``int``) and may narrow it (``pattern``, ``choices``,
``min``/``max``, ``max_length``, ``root``/``exists``); a value is checked and normalised here
(pure, apart from resolving a path against the file system) before it goes anywhere.

A value only ever becomes (part of) one item of ``command``, or one ``environment`` value:
``{param}`` is replaced in each item by the value with its braces doubled, so the supervisor's
own expansion (``{port}``, ``{base_url}``...) turns them back into the literal text and never
expands what a client sent. Nothing is run through a shell, nothing is split. A value may not
start with ``-`` (it could be read as an option) unless its parameter says ``allow_dash``, and
control characters (line breaks included) and NUL are always refused.

An instance's name is the template's and a short hash of its normalised arguments
(``tensorboard-3f9a2c``): the same arguments always name the same instance.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PARAM_TYPES = ("string", "path", "int")
PARAM_OPTIONS = frozenset(
    {"type", "description", "required", "default", "pattern", "choices", "min", "max", "max_length", "allow_dash", "root", "exists"}
)
TEMPLATE_OPTIONS = frozenset({"params", "max_instances", "description"})
DEFAULT_MAX_INSTANCES = 3
MOST_INSTANCES = 100
DEFAULT_MAX_LENGTH = 1024
# Substituted by the supervisor at each start (and by other options' templates): a parameter
# of one of these names would be ambiguous.
RESERVED_PARAMS = frozenset({"port", "unix_socket", "base_url", "name", "public_prefix", "url"})
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_INT_TEXT = re.compile(r"-?[0-9]{1,18}")
# Server options an instance cannot take from its template: each instance needs its own
# address, and it is started when it is created.
_FORBIDDEN_OPTIONS = {
    "port": "each instance needs a port of its own",
    "autostart": "instances start when created",
    "path": "each instance is served at its own name",
    "aliases": "each instance is served at its own name",
}


class TemplateConfigError(ValueError):
    """A template that cannot be used; the message names the template and what is wrong."""


class ArgumentError(ValueError):
    """A client's argument that is refused: ``param`` names it (or None for the request as a
    whole), the message says why (a 400)."""

    def __init__(self, param: str | None, detail: str) -> None:
        super().__init__(f"argument {param!r}: {detail}" if param else detail)
        self.param = param
        self.detail = detail


@dataclass(frozen=True)
class Param:
    """One declared parameter of a template."""

    name: str
    type: str = "string"
    description: str = ""
    required: bool = True
    default: Any = None
    pattern: re.Pattern[str] | None = None
    choices: tuple[Any, ...] | None = None
    min: int | None = None
    max: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    allow_dash: bool = False
    root: str = ""  # path: relative values resolve here, and every value must stay inside
    exists: str | None = None  # path: "dir", "file", "any", or None (not checked)

    def check(self, value: Any) -> str:
        """The value as text, normalised, or ArgumentError naming this parameter."""
        if self.type == "int":
            text = self._int_text(value)
        else:
            if not isinstance(value, str):
                raise ArgumentError(self.name, f"must be a string, not {_json_type(value)}")
            text = value
        if len(text) > self.max_length:
            raise ArgumentError(self.name, f"is {len(text)} characters long; at most {self.max_length} are allowed")
        if not text and self.type != "string":
            raise ArgumentError(self.name, "is empty")
        bad = next((char for char in text if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp")), None)
        if bad is not None:
            raise ArgumentError(self.name, f"contains the control character {bad!r}, which no argument may")
        if text.startswith("-") and not self.allow_dash and not (self.type == "int" and self.min is not None and self.min < 0):
            raise ArgumentError(self.name, f"starts with '-' (it could be read as an option): {_short(text)!r}")
        if self.pattern is not None and self.pattern.fullmatch(text) is None:
            raise ArgumentError(self.name, f"{_short(text)!r} does not match the pattern {self.pattern.pattern!r}")
        if self.choices is not None and text not in [str(choice) for choice in self.choices]:
            listed = ", ".join(repr(str(choice)) for choice in self.choices)
            raise ArgumentError(self.name, f"{_short(text)!r} is not one of {listed}")
        if self.type == "path":
            text = self._resolve(text)
        return text

    def _int_text(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ArgumentError(self.name, f"must be a whole number, not {_json_type(value)}")
        if isinstance(value, str):
            if _INT_TEXT.fullmatch(value) is None:
                raise ArgumentError(self.name, f"must be a whole number, not {_short(value)!r}")
            value = int(value)
        if abs(value) >= 10**18:  # the text form's bound too; JSON allows any number of digits
            raise ArgumentError(self.name, "is too large a number")
        if self.min is not None and value < self.min:
            raise ArgumentError(self.name, f"must be at least {self.min}, not {value}")
        if self.max is not None and value > self.max:
            raise ArgumentError(self.name, f"must be at most {self.max}, not {value}")
        return str(value)

    def _resolve(self, text: str) -> str:
        try:
            os.fsencode(text)
        except UnicodeError:
            raise ArgumentError(self.name, "cannot be encoded as a file name") from None
        root = self.root
        path = os.path.realpath(os.path.join(root, text))
        if os.path.commonpath([root, path]) != root:
            raise ArgumentError(self.name, f"{_short(text)!r} is outside {root}")
        if self.exists == "dir" and not os.path.isdir(path):
            raise ArgumentError(self.name, f"{_short(text)!r} is not a directory")
        if self.exists == "file" and not os.path.isfile(path):
            raise ArgumentError(self.name, f"{_short(text)!r} is not a file")
        if self.exists == "any" and not os.path.exists(path):
            raise ArgumentError(self.name, f"{_short(text)!r} does not exist")
        return path

    def describe(self) -> dict[str, Any]:
        """The parameter as the API and the launcher's form show it."""
        info: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        if self.description:
            info["description"] = self.description
        if not self.required:
            info["default"] = self.default
        for key in ("min", "max"):
            if getattr(self, key) is not None:
                info[key] = getattr(self, key)
        if self.pattern is not None:
            info["pattern"] = self.pattern.pattern
        if self.choices is not None:
            info["choices"] = list(self.choices)
        if self.type != "int":
            info["max_length"] = self.max_length
        return info


@dataclass(frozen=True)
class Template:
    """A parsed template: its parameters and the server options every instance gets."""

    name: str
    params: dict[str, Param]
    settings: dict[str, Any]  # server options (command and environment still with {param})
    max_instances: int = DEFAULT_MAX_INSTANCES
    description: str = ""
    title: str = ""
    fingerprint: Any = field(default=None, compare=False)  # equal when the declaration says the same

    def arguments(self, args: Any) -> dict[str, str]:
        """Every parameter's value, checked and normalised (defaults filled in), from a
        client's ``args``. Raises ArgumentError: unknown or missing parameters, bad values."""
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise ArgumentError(None, f"'args' must be an object of parameter values, not {_json_type(args)}")
        unknown = [str(key) for key in args if key not in self.params]
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ArgumentError(unknown[0], f"is not a parameter of template {self.name!r} (its parameters: {known})")
        values: dict[str, str] = {}
        for name, param in self.params.items():
            if name in args and args[name] is not None and not (args[name] == "" and not param.required):
                values[name] = param.check(args[name])
            elif param.required:
                raise ArgumentError(name, f"is required by template {self.name!r}")
            else:
                values[name] = "" if param.default is None else param.check(param.default)
        return values

    def instance_names(self, values: Mapping[str, str]) -> list[str]:
        """Names for the instance of these arguments, shortest first (a longer one is tried
        when a shorter is taken by another server)."""
        digest = hashlib.sha256(json.dumps(sorted(values.items()), ensure_ascii=False).encode()).hexdigest()
        return [f"{self.name}-{digest[:length]}" for length in (6, 10, 16)]

    def server_settings(self, name: str, values: Mapping[str, str]) -> dict[str, Any]:
        """The options of the instance ``name``, whose arguments are ``values``."""
        variables = {**values, "name": name}
        settings = dict(self.settings)
        settings["command"] = [substitute(str(item), variables) for item in self.settings.get("command", [])]
        if "environment" in self.settings:
            settings["environment"] = {
                str(key): None if item is None else substitute(str(item), variables)
                for key, item in self.settings["environment"].items()
            }
        entry = dict(self.settings.get("launcher_entry") or {})
        summary = ", ".join(f"{key}={_tail(value, 40)}" for key, value in values.items())
        entry["title"] = f"{self.title} ({summary})" if summary else f"{self.title} ({name})"
        entry["path_info"] = name + "/"
        settings["launcher_entry"] = entry
        return settings

    @property
    def in_launcher(self) -> bool:
        entry = self.settings.get("launcher_entry") or {}
        return bool(entry.get("enabled", True)) if isinstance(entry, Mapping) else True

    def describe(self) -> dict[str, Any]:
        entry = self.settings.get("launcher_entry") or {}
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "category": entry.get("category", ""),
            "params": [param.describe() for param in self.params.values()],
            "max_instances": self.max_instances,
        }


def substitute(template: str, variables: Mapping[str, str]) -> str:
    """``template`` with ``{variable}`` replaced for the given variables only; everything
    else (other fields, ``{{``/``}}``) is kept for the supervisor's ``str.format``, and the
    values are escaped so that it gives them back literally."""
    out: list[str] = []
    for literal, field_name, spec, conversion in string.Formatter().parse(template):
        out.append(_escape(literal))
        if field_name is None:
            continue
        if field_name in variables:
            out.append(_escape(variables[field_name]))
        else:
            out.append("{" + field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def fields_of(template: str) -> list[tuple[str, str, str | None]]:
    """The replacement fields of a ``str.format`` template: (name, spec, conversion)."""
    try:
        return [(name, spec or "", conversion) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise TemplateConfigError(f"cannot parse {template!r}: {exc}") from None


# -- parsing a template's declaration ---------------------------------------------------------


def parse_template(name: Any, raw: Any, *, cwd: str | None = None) -> Template:
    """One entry of ``c.ServerProxy.templates``, checked; TemplateConfigError otherwise. The
    server options are checked by the caller (:func:`trioproxy.instances.check_template`),
    by building a sample instance."""
    if not isinstance(name, str) or _TEMPLATE_NAME.fullmatch(name) is None:
        raise TemplateConfigError(
            f"template name {name!r}: must be letters, digits, '_', '.' or '-' (at most 64, not starting with '.' or '-')"
        )
    where = f"template {name!r}"
    if not isinstance(raw, Mapping):
        raise TemplateConfigError(f"{where}: expected a dict of options, got {type(raw).__name__}")
    settings = {str(key): value for key, value in raw.items() if key not in TEMPLATE_OPTIONS}
    for option, why in _FORBIDDEN_OPTIONS.items():
        if option in settings:
            raise TemplateConfigError(f"{where}: option {option!r} cannot be set on a template ({why})")
    unix_socket = settings.get("unix_socket")
    if isinstance(unix_socket, str) and unix_socket:
        raise TemplateConfigError(f"{where}: option 'unix_socket' must be True or False on a template (each instance needs a socket of its own)")
    command = settings.get("command")
    if not isinstance(command, (list, tuple)) or not command or not all(isinstance(item, str) for item in command):
        raise TemplateConfigError(f"{where}: 'command' must be a non-empty list of strings (no callable: the arguments are substituted in it)")
    environment = settings.get("environment", {})
    if not isinstance(environment, Mapping):
        raise TemplateConfigError(f"{where}: 'environment' must be a dict (no callable: the arguments are substituted in it)")
    max_instances = raw.get("max_instances", DEFAULT_MAX_INSTANCES)
    if isinstance(max_instances, bool) or not isinstance(max_instances, int) or not 1 <= max_instances <= MOST_INSTANCES:
        raise TemplateConfigError(f"{where}: 'max_instances' must be a whole number from 1 to {MOST_INSTANCES}, got {max_instances!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise TemplateConfigError(f"{where}: 'description' must be a string")
    raw_params = raw.get("params", {})
    if not isinstance(raw_params, Mapping):
        raise TemplateConfigError(f"{where}: 'params' must be a dict of parameter declarations")
    root_default = os.path.realpath(str(settings.get("cwd") or cwd or os.getcwd()))
    params = {str(key): _parse_param(where, key, value, root_default) for key, value in raw_params.items()}
    used: set[str] = set()
    texts = [str(item) for item in command] + [str(value) for value in environment.values() if value is not None]
    for text in texts:
        for field_name, spec, conversion in fields_of(text):
            if field_name in params:
                if spec or conversion:
                    raise TemplateConfigError(f"{where}: {{{field_name}}} takes no format spec or conversion (in {text!r})")
                used.add(field_name)
    unused = [param for param in params if param not in used]
    if unused:
        raise TemplateConfigError(f"{where}: parameter {unused[0]!r} is used neither in 'command' nor in 'environment'")
    entry = settings.get("launcher_entry") or {}
    title = entry.get("title") if isinstance(entry, Mapping) else None
    from .config import _comparable  # functions by their code, as a reload compares servers

    fingerprint = _comparable(dict(raw))
    return Template(name, params, settings, max_instances, description, str(title or name), fingerprint)


def _parse_param(where: str, name: Any, raw: Any, root_default: str) -> Param:
    if not isinstance(name, str) or _PARAM_NAME.fullmatch(name) is None:
        raise TemplateConfigError(f"{where}: parameter name {name!r} must be an identifier (letters, digits, '_')")
    if name in RESERVED_PARAMS:
        raise TemplateConfigError(f"{where}: parameter name {name!r} is reserved ({{{name}}} is trioproxy's)")
    where = f"{where}: parameter {name!r}"
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        raise TemplateConfigError(f"{where}: expected a dict such as {{'type': 'string'}}, got {type(raw).__name__}")
    unknown = sorted(str(key) for key in raw if key not in PARAM_OPTIONS)
    if unknown:
        raise TemplateConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(PARAM_OPTIONS))})")
    kind = raw.get("type", "string")
    if kind not in PARAM_TYPES:
        raise TemplateConfigError(f"{where}: type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
    options: dict[str, Any] = {"name": name, "type": kind}
    if "description" in raw:
        options["description"] = str(raw["description"])
    if "pattern" in raw:
        try:
            options["pattern"] = re.compile(str(raw["pattern"]))
        except re.error as exc:
            raise TemplateConfigError(f"{where}: 'pattern' is not a regular expression: {exc}") from None
    if "choices" in raw:
        choices = raw["choices"]
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in choices):
            raise TemplateConfigError(f"{where}: 'choices' must be a non-empty list of strings or numbers")
        options["choices"] = tuple(choices)
    for key in ("min", "max"):
        if key in raw:
            if kind != "int" or isinstance(raw[key], bool) or not isinstance(raw[key], int):
                raise TemplateConfigError(f"{where}: {key!r} is for 'int' parameters and must be a whole number")
            options[key] = raw[key]
    if "max_length" in raw:
        value = raw["max_length"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            raise TemplateConfigError(f"{where}: 'max_length' must be a whole number from 1 to 65536")
        options["max_length"] = value
    if "allow_dash" in raw:
        options["allow_dash"] = bool(raw["allow_dash"])
    if kind == "path":
        root = raw.get("root", root_default)
        if not isinstance(root, str) or not root:
            raise TemplateConfigError(f"{where}: 'root' must be a directory")
        options["root"] = os.path.realpath(os.path.expanduser(root))
        exists = raw.get("exists")
        if exists not in (None, False, "dir", "file", "any"):
            raise TemplateConfigError(f"{where}: 'exists' must be 'dir', 'file', 'any' or None")
        options["exists"] = exists or None
    elif "root" in raw or "exists" in raw:
        raise TemplateConfigError(f"{where}: 'root' and 'exists' are for 'path' parameters")
    has_default = "default" in raw
    required = raw.get("required", not has_default)
    if not isinstance(required, bool):
        raise TemplateConfigError(f"{where}: 'required' must be True or False")
    options["required"] = required
    param = Param(**options)
    if has_default and raw["default"] is not None:
        try:
            param.check(raw["default"])
        except ArgumentError as exc:
            raise TemplateConfigError(f"{where}: the default {raw['default']!r} {exc.detail}") from None
    return Param(**options, default=raw.get("default"))


def sample_value(param: Param) -> str:
    """A value the parameter could take, for checking the template's options at load time."""
    if param.type == "int":
        return str(param.min if param.min is not None else 0)
    if param.type == "path":
        return param.root
    return "sample"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _short(text: str, most: int = 60) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _tail(text: str, most: int) -> str:
    """The end of a long value (of a path, the part that tells instances apart)."""
    return text if len(text) <= most else "..." + text[3 - most :]
