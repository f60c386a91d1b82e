"""Templates without I/O (trioproxy.templates): substitution, parameter checks, names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trioproxy.templates import ArgumentError, Template, TemplateConfigError, parse_template, substitute
from trioproxy.templating import expand


def test_substitution_leaves_other_fields_and_escapes_values() -> None:
    variables = {"logdir": "{port} {{x}} }{", "name": "tb-1"}
    for template in ["--logdir={logdir}", "{logdir}", "{port}:{logdir}:{base_url}", "{{literal}} {logdir}", "{port!r:>5}"]:
        once = substitute(template, variables)
        # What the supervisor then does with it: every other field expanded, values literal.
        expected = template.replace("{logdir}", "\0").format(port=8080, base_url="/b/").replace("\0", variables["logdir"])
        assert expand(once, {"port": 8080, "base_url": "/b/"}) == expected
    assert substitute("{base_url}{name}/", variables) == "{base_url}tb-1/"


def template(**params: Any) -> Template:
    return parse_template("t", {"command": ["run", *(f"{{{name}}}" for name in params)], "params": params}, cwd="/")


@pytest.mark.parametrize(
    ("declaration", "value", "expected"),
    [
        ({"type": "string"}, "hello world", "hello world"),
        ({"type": "string", "allow_dash": True}, "-v", "-v"),
        ({"type": "int"}, 42, "42"),
        ({"type": "int"}, "0042", "42"),
        ({"type": "int", "min": -5}, -3, "-3"),
        ({"type": "string", "choices": ["a", "b"]}, "b", "b"),
        ({"type": "int", "choices": [1, 2]}, 2, "2"),
        ({"type": "path", "root": "/usr"}, "lib/../bin", "/usr/bin"),
        ({"type": "path", "root": "/"}, "/etc", "/etc"),
    ],
)
def test_values_that_are_taken_and_how(declaration: dict[str, Any], value: Any, expected: str) -> None:
    assert template(p=declaration).arguments({"p": value}) == {"p": expected}


@pytest.mark.parametrize(
    ("declaration", "value", "detail"),
    [
        ({"type": "string"}, "-rf", "starts with '-'"),
        ({"type": "int"}, -1, "starts with '-'"),
        ({"type": "int", "max": 10}, 11, "at most 10"),
        ({"type": "int"}, "1e3", "whole number"),
        ({"type": "int"}, "9" * 19, "whole number"),
        ({"type": "int"}, 10**18, "too large"),
        ({"type": "int"}, 10**4000, "too large"),
        ({"type": "string"}, "tab\there", "control character"),
        ({"type": "string"}, "line\u2028sep", "control character"),
        ({"type": "string"}, "\udc80", "control character"),
        ({"type": "string"}, None, "is required"),
        ({"type": "string"}, ["a"], "must be a string, not an array"),
        ({"type": "string", "max_length": 3}, "abcd", "at most 3"),
        ({"type": "string", "choices": ["a"]}, "b", "is not one of 'a'"),
        ({"type": "string", "pattern": "[a-z]+"}, "abc1", "does not match"),
        ({"type": "path", "root": "/usr"}, "../etc", "is outside /usr"),
        ({"type": "path", "root": "/usr"}, "", "is empty"),
    ],
)
def test_values_that_are_refused_name_the_parameter(declaration: dict[str, Any], value: Any, detail: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        template(p=declaration).arguments({"p": value})
    assert caught.value.param == "p"
    assert detail in str(caught.value) and str(caught.value).startswith("argument 'p': ")


def test_a_path_cannot_leave_its_root_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path)
    with pytest.raises(ArgumentError, match="is outside"):
        template(p={"type": "path", "root": str(tmp_path / "root")}).arguments({"p": "out"})


def test_defaults_optional_values_and_names() -> None:
    t = template(a={"type": "string"}, b={"type": "int", "default": 5}, c={"type": "string", "required": False})
    values = t.arguments({"a": "x"})
    assert values == {"a": "x", "b": "5", "c": ""}
    assert t.arguments({"a": "x", "b": "5", "c": ""}) == values
    names = t.instance_names(values)
    assert names == t.instance_names(dict(reversed(list(values.items()))))  # order does not matter
    assert [len(name) for name in names] == [len("t-") + n for n in (6, 10, 16)]
    assert t.instance_names({**values, "b": "6"})[0] != names[0]


def test_template_declarations_that_cannot_work() -> None:
    with pytest.raises(TemplateConfigError, match="'min' is for 'int' parameters"):
        template(p={"type": "string", "min": 1})
    with pytest.raises(TemplateConfigError, match="'root' and 'exists' are for 'path'"):
        template(p={"type": "int", "root": "/"})
    with pytest.raises(TemplateConfigError, match="'unix_socket' must be True or False"):
        parse_template("t", {"command": ["x"], "unix_socket": "/tmp/s"})
    with pytest.raises(TemplateConfigError, match="no callable"):
        parse_template("t", {"command": lambda port: ["x"]})
    with pytest.raises(TemplateConfigError, match="must be an identifier"):
        parse_template("t", {"command": ["{a-b}"], "params": {"a-b": "string"}})
