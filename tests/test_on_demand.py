"""Instances on demand, with a real trioproxy and real backend processes: creating instances
from a template over the API, their URLs, control, culling and removal, limits, the refusals
(bad arguments, injection attempts, collisions, no credentials, another origin), reloads, and
the launcher's form."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy.supervisor import State

from .conftest import (
    BACKENDS,
    PY,
    TOKEN,
    ProxyProcess,
    echo_command,
    free_port,
    launch_trioproxy,
    pid_alive,
    start_proxy,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

API = "server-proxy/api/servers"
ARGV_ENV = str(BACKENDS / "argv_env.py")


def viewer(tmp_path: Path, **options: Any) -> dict[str, Any]:
    """A template whose backend answers with the argv and environment it got."""
    (tmp_path / "runs" / "exp1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "exp2").mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "command": [PY, ARGV_ENV, "{port}", "--logdir", "{logdir}", "--tag={tag}", "--reload", "{reload}"],
        "environment": {"MARK": "tag:{tag}"},
        "cwd": str(tmp_path),
        "timeout": 20,
        "params": {
            "logdir": {"type": "path", "exists": "dir", "description": "Log directory"},
            "tag": {"type": "string", "pattern": "[A-Za-z0-9_.{}$;() -]*", "default": "none", "max_length": 200},
            "reload": {"type": "int", "min": 1, "max": 3600, "default": 5},
        },
        "max_instances": 2,
        "launcher_entry": {"title": "Viewer", "category": "Tools"},
    }
    settings.update(options)
    return {"viewer": settings}


async def create(client: httpx.AsyncClient, args: dict[str, Any], template: str = "viewer", **kwargs: Any) -> httpx.Response:
    return await client.post(API, json={"template": template, "args": args}, **kwargs)


async def backend_view(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"{name}/", params={"names": "MARK"})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_an_instance_is_created_listed_reached_and_removed_when_stopped(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}}, templates=viewer(tmp_path))
    async with proxy.client() as client:
        response = await create(client, {"logdir": "runs/exp1", "tag": "first"})
        assert response.status_code == 201, response.text
        info = response.json()
        name = info["name"]
        assert name.startswith("viewer-") and len(name) == len("viewer-") + 6
        assert info["created"] is True and info["state"] == "ready"
        assert info["template"] == "viewer"
        assert info["args"] == {"logdir": str(tmp_path / "runs" / "exp1"), "tag": "first", "reload": "5"}
        assert info["url"] == f"/{name}/"
        assert response.headers["location"] == f"/{API}/{name}"

        view = await backend_view(client, name)
        assert view["argv"] == ["--logdir", str(tmp_path / "runs" / "exp1"), "--tag=first", "--reload", "5"]
        assert view["env"] == {"MARK": "tag:first"}

        listed = (await client.get(API)).json()["servers"]
        assert [server["name"] for server in listed] == ["echo", name]
        assert listed[1]["template"] == "viewer" and "template" not in listed[0]
        info_entries = (await client.get("server-proxy/servers-info")).json()["server_processes"]
        entry = next(item for item in info_entries if item["name"] == name)
        assert entry["launcher_entry"]["title"].startswith("Viewer (logdir=")
        assert entry["launcher_entry"]["path_info"] == f"{name}/"
        templates = (await client.get("server-proxy/api/templates")).json()["templates"]
        assert templates[0]["name"] == "viewer" and templates[0]["instances"] == [name]
        assert [param["name"] for param in templates[0]["params"]] == ["logdir", "tag", "reload"]

        # The same arguments (written differently) are the same instance.
        again = await create(client, {"logdir": "./runs/exp1/", "tag": "first", "reload": 5})
        assert again.status_code == 200 and again.json()["name"] == name and again.json()["created"] is False

        pid = proxy.supervisors[name].pid
        assert pid is not None and pid_alive(pid)
        stopped = await client.post(f"{API}/{name}/stop")
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["state"] == "stopped" and stopped.json()["removed"] is True
        assert not pid_alive(pid)
        assert name not in proxy.supervisors
        assert (await client.get(f"{name}/")).status_code == 404
        assert (await client.get(f"{API}/{name}")).status_code == 404
        assert [server["name"] for server in (await client.get(API)).json()["servers"]] == ["echo"]


async def test_delete_removes_an_instance_and_restart_keeps_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, templates=viewer(tmp_path))
    async with proxy.client() as client:
        name = (await create(client, {"logdir": "runs/exp1"})).json()["name"]
        first_pid = proxy.supervisors[name].pid
        for _ in range(3):  # the stopped moment inside a restart never removes it
            restarted = await client.post(f"{API}/{name}/restart")
            assert restarted.status_code == 200, restarted.text
            assert restarted.json()["state"] == "ready"
        await trio.sleep(0.2)
        assert name in proxy.supervisors and proxy.supervisors[name].pid != first_pid
        assert (await backend_view(client, name))["argv"][1] == str(tmp_path / "runs" / "exp1")
        pid = proxy.supervisors[name].pid
        assert pid is not None
        deleted = await client.delete(f"{API}/{name}")
        assert deleted.status_code == 200 and deleted.json()["removed"] is True
        assert name not in proxy.supervisors and not pid_alive(pid)
        # A new one for the same arguments gets the same name again.
        assert (await create(client, {"logdir": "runs/exp1"})).json()["name"] == name


async def test_an_idle_instance_is_culled_and_removed(nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trioproxy.instances")
    proxy = await start_proxy(nursery, templates=viewer(tmp_path, idle_timeout=0.5))
    async with proxy.client() as client:
        name = (await create(client, {"logdir": "runs/exp2"})).json()["name"]
        pid = proxy.supervisors[name].pid
        assert pid is not None
        await wait_for(lambda: name not in proxy.supervisors, timeout=20)
        assert not pid_alive(pid)
        assert (await client.get(f"{name}/")).status_code == 404
    assert f"instance {name!r} of template 'viewer' removed (idle for 0.5 s)" in caplog.text


async def test_an_instance_that_exits_by_itself_is_removed(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "once.py"
    script.write_text(
        "import http.server, sys, threading\n"
        "server = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)\n"
        "threading.Timer(float(sys.argv[2]), server.shutdown).start()\n"
        "server.serve_forever()\n"
    )
    templates = {"once": {"command": [PY, str(script), "{port}", "{seconds}"], "params": {"seconds": {"type": "int", "min": 1}}}}
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        response = await create(client, {"seconds": "1"}, template="once")
        assert response.status_code == 201, response.text
        name = response.json()["name"]
        await wait_for(lambda: name not in proxy.supervisors, timeout=20)


async def test_wait_0_answers_at_once_and_a_failing_first_start_leaves_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    templates = {
        **viewer(tmp_path),
        "broken": {
            "command": [PY, "-c", "import sys; print('cannot open', sys.argv[1]); sys.exit(3)", "{what}"],
            "params": {"what": {"type": "string"}},
            "max_failures": 1,
        },
    }
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        response = await create(client, {"logdir": "runs/exp1"}, params={"wait": "0"})
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "starting"
        name = response.json()["name"]
        with trio.fail_after(20):
            await proxy.supervisors[name].wait_for_state(State.READY)

        failed = await create(client, {"what": "settings.toml"}, template="broken")
        assert failed.status_code == 503, failed.text
        assert "cannot open settings.toml" in json.dumps(failed.json())
        assert [server["name"] for server in (await client.get(API)).json()["servers"]] == [name]
        # ... and it did not count against the limit.
        assert (await create(client, {"what": "x"}, template="broken", params={"wait": "0"})).status_code == 202


async def test_max_instances_is_a_429_also_for_concurrent_creations(nursery: trio.Nursery, tmp_path: Path) -> None:
    for index in range(6):
        (tmp_path / "runs" / f"d{index}").mkdir(parents=True)
    proxy = await start_proxy(nursery, templates=viewer(tmp_path))
    answers: list[httpx.Response] = []
    async with proxy.client() as client:

        async def one(index: int) -> None:
            answers.append(await create(client, {"logdir": f"runs/d{index}"}))

        async with trio.open_nursery() as inner:
            for index in range(5):
                inner.start_soon(one, index)
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [201, 201, 429, 429, 429], [answer.text for answer in answers]
        refusal = next(answer for answer in answers if answer.status_code == 429)
        assert "max_instances: 2" in refusal.json()["message"]
        assert len([name for name in proxy.supervisors if name.startswith("viewer-")]) == 2
        # One stopped frees a place (d5 was not among the five, which ever two got in).
        first = next(answer.json()["name"] for answer in answers if answer.status_code == 201)
        assert (await client.delete(f"{API}/{first}")).status_code == 200
        assert (await create(client, {"logdir": "runs/d5"})).status_code == 201


@pytest.mark.parametrize(
    ("args", "param", "detail"),
    [
        ({"logdir": "runs/exp1", "tag": "--help"}, "tag", "starts with '-'"),
        ({"logdir": "--version"}, "logdir", "starts with '-'"),
        ({"logdir": "runs/exp1", "tag": "a\nb"}, "tag", "control character"),
        ({"logdir": "runs/exp1", "tag": "a\rb"}, "tag", "control character"),
        ({"logdir": "runs/exp1", "tag": "a\x00b"}, "tag", "control character"),
        ({"logdir": "runs/exp1", "tag": "x" * 201}, "tag", "at most 200"),
        ({"logdir": "runs/exp1", "tag": "a|b"}, "tag", "does not match the pattern"),
        ({"logdir": "runs/exp1", "tag": 5}, "tag", "must be a string"),
        ({"logdir": "runs/exp1", "reload": "5; rm -rf /"}, "reload", "whole number"),
        ({"logdir": "runs/exp1", "reload": 0}, "reload", "at least 1"),
        ({"logdir": "runs/exp1", "reload": True}, "reload", "whole number"),
        ({"logdir": "runs/exp1", "reload": 1.5}, "reload", "whole number"),
        ({"logdir": "../../etc"}, "logdir", "is outside"),
        ({"logdir": "/etc"}, "logdir", "is outside"),
        ({"logdir": "runs/missing"}, "logdir", "is not a directory"),
        ({"logdir": "runs/exp1", "evil": "1"}, "evil", "is not a parameter"),
        ({"tag": "x"}, "logdir", "is required"),
    ],
)
async def test_bad_arguments_are_400s_naming_the_parameter(
    nursery: trio.Nursery, tmp_path: Path, args: dict[str, Any], param: str, detail: str
) -> None:
    proxy = await start_proxy(nursery, templates=viewer(tmp_path))
    async with proxy.client() as client:
        response = await create(client, args)
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert f"argument {param!r}" in message and detail in message, message
        assert list(proxy.supervisors) == []


async def test_values_reach_the_command_whole_and_literally(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Shell syntax, templates and spaces inside a value: one argument, exactly as sent."""
    for index in range(2):
        (tmp_path / "runs" / f"x {{port}} $(id) ;{index}").mkdir(parents=True)
    templates = viewer(tmp_path, max_instances=10)
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        for tag in ["$(touch pwned)", "a; touch pwned", "{port}", "{{port}}", "{base_url}{name}", "a b  c", "${HOME}"]:
            response = await create(client, {"logdir": "runs/x {port} $(id) ;0", "tag": tag})
            assert response.status_code == 201, response.text
            view = await backend_view(client, response.json()["name"])
            assert view["argv"] == ["--logdir", str(tmp_path / "runs" / "x {port} $(id) ;0"), f"--tag={tag}", "--reload", "5"]
            assert view["env"] == {"MARK": f"tag:{tag}"}
            assert (await client.delete(f"{API}/{response.json()['name']}")).status_code == 200
    assert not (tmp_path / "pwned").exists()


async def test_requests_that_are_not_a_creation_are_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, templates=viewer(tmp_path))
    async with proxy.client() as client:
        cases = [
            (dict(json={"template": "nope", "args": {}}), 404, "No template named 'nope'"),
            (dict(json={"template": ["viewer"]}), 400, "'template' must be"),
            (dict(json={"template": "viewer", "args": ["runs"]}), 400, "'args' must be an object"),
            (dict(json={"template": "viewer", "args": {}, "name": "mine"}), 400, "Unknown key 'name'"),
            (dict(json=["viewer"]), 400, "Expected a JSON object"),
            (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
            (dict(content=b'{"template": "viewer"}', headers={"Content-Type": "text/plain"}), 415, "as JSON"),
            (dict(data={"template": "viewer"}), 415, "as JSON"),
            (dict(content=b"[" * 100_000, headers={"Content-Type": "application/json"}), 413, "over 65536 bytes"),
            (dict(content=b"[" * 60_000, headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        ]
        for kwargs, status, message in cases:
            response = await client.post(API, **kwargs)
            assert response.status_code == status, (kwargs, response.text)
            assert message in response.json()["message"], response.text
        assert list(proxy.supervisors) == []


async def test_unauthenticated_and_cross_origin_creations_are_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, templates=viewer(tmp_path))
    body = {"template": "viewer", "args": {"logdir": "runs/exp1"}}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as stranger:
        response = await stranger.post(API, json=body)
        assert response.status_code == 403
        response = await stranger.post(API, json=body, headers={"Authorization": "token wrong"})
        assert response.status_code == 403
        assert (await stranger.get("server-proxy/api/templates")).status_code == 403
    async with proxy.client() as client:
        response = await client.post(API, json=body, headers={"Origin": "http://evil.example"})
        assert response.status_code == 403
        assert response.json()["message"] == "Cross-origin request refused."
        # A cookie-carrying form post from another site would be text/plain or a form: 415 too.
        response = await client.post(API, content=json.dumps(body), headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
        assert list(proxy.supervisors) == []
        host = proxy.url.split("/")[2]
        response = await client.post(API, json=body, headers={"Origin": f"http://{host}"})
        assert response.status_code == 201, response.text


async def test_an_instance_name_taken_by_a_server_is_not_used(nursery: trio.Nursery, tmp_path: Path) -> None:
    template = viewer(tmp_path)
    # The name the instance would get, found the way trioproxy finds it.
    from trioproxy.instances import load_templates

    loaded, _ = load_templates(template)
    values = loaded["viewer"].arguments({"logdir": str(tmp_path / "runs" / "exp1")})
    names = loaded["viewer"].instance_names(values)
    proxy = await start_proxy(nursery, {names[0]: {"command": echo_command()}}, templates=template)
    async with proxy.client() as client:
        response = await create(client, {"logdir": "runs/exp1"})
        assert response.status_code == 201, response.text
        assert response.json()["name"] == names[1]
        # The configured server is untouched, and the instance is reached at its own name.
        assert (await client.get(f"{names[0]}/x")).json()["target"] == "/x"
        assert (await backend_view(client, names[1]))["argv"][0] == "--logdir"
        # Stopping the configured server does not remove it; stopping the instance does.
        assert (await client.post(f"{API}/{names[0]}/stop")).json().get("removed") is None
        assert names[0] in proxy.supervisors


async def test_an_instance_name_under_a_servers_path_is_not_used(nursery: trio.Nursery, tmp_path: Path) -> None:
    template = viewer(tmp_path)
    from trioproxy.instances import load_templates

    loaded, _ = load_templates(template)
    names = loaded["viewer"].instance_names(loaded["viewer"].arguments({"logdir": str(tmp_path / "runs" / "exp1")}))
    # A server named otherwise, served at a path whose first segment is that name.
    servers = {"tools": {"command": echo_command(), "path": f"{names[0]}/deep"}}
    proxy = await start_proxy(nursery, servers, templates=template)
    async with proxy.client() as client:
        response = await create(client, {"logdir": "runs/exp1"})
        assert response.status_code == 201, response.text
        assert response.json()["name"] == names[1]
        assert (await client.get(f"{names[0]}/deep/x")).json()["target"] == "/x"


@pytest.mark.parametrize(
    ("templates", "detail"),
    [
        ({"t": {"command": ["x", "{a}"], "params": {"a": {"type": "float"}}}}, "type 'float'"),
        ({"t": {"command": ["x"], "params": {"a": "string"}}}, "'a' is used neither"),
        ({"t": {"command": ["x", "{port}"], "params": {"port": "int"}}}, "'port' is reserved"),
        ({"t": {"command": ["x", "{a!r}"], "params": {"a": "string"}}}, "no format spec"),
        ({"t": {"command": ["x", "{a}"], "params": {"a": {"pattern": "("}}}}, "not a regular expression"),
        ({"t": {"command": ["x", "{a}"], "params": {"a": {"default": "-x"}}}}, "starts with '-'"),
        ({"t": {"command": ["x", "{a}"], "params": {"a": {"colour": 1}}}}, "unknown key 'colour'"),
        ({"t": {"command": ["x", "{a}", "{nope}"], "params": {"a": "string"}}}, "nope"),
        ({"t": {"command": "x {a}", "params": {"a": "string"}}}, "non-empty list"),
        ({"t": {"command": ["x"], "port": 8080}}, "'port' cannot be set"),
        ({"t": {"command": ["x"], "path": "a/b"}}, "'path' cannot be set"),
        ({"t": {"command": ["x"], "max_instances": 0}}, "max_instances"),
        ({"t": {"command": ["x"], "timeout": -1}}, "timeout"),
        ({"t/x": {"command": ["x"]}}, "template name"),
    ],
)
def test_templates_that_cannot_work_are_refused_with_the_reason(templates: dict[str, Any], detail: str) -> None:
    from trioproxy.instances import load_templates

    loaded, invalid = load_templates(templates)
    assert loaded == {}
    [reason] = invalid.values()
    assert detail in reason, reason


# -- with trioproxy as a command: its config file, reloads ------------------------------------


def write_config(path: Path, tmp_path: Path, templates: dict[str, Any]) -> None:
    path.write_text(f"c.ServerProxy.servers = {{'echo': {{'command': {echo_command()!r}}}}}\nc.ServerProxy.templates = {templates!r}\n")


async def test_trioproxy_serves_templates_from_its_config_and_reload_removes_them(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    config = tmp_path / "config.py"
    templates = viewer(tmp_path)
    other = {"other": {"command": [PY, ARGV_ENV, "{port}", "{word}"], "params": {"word": {"pattern": "[a-z]+"}}}}
    write_config(config, tmp_path, {**templates, **other})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)], cwd=str(tmp_path))
    proxy_processes.append(proxy)
    headers = {"Authorization": f"token {TOKEN}"}
    async with httpx.AsyncClient(base_url=proxy.base, headers=headers, timeout=30) as client:
        viewer_name = (await create(client, {"logdir": "runs/exp1"})).json()["name"]
        other_response = await create(client, {"word": "hello"}, template="other")
        assert other_response.status_code == 201, other_response.text
        other_name = other_response.json()["name"]
        assert (await client.get(f"{other_name}/")).json()["argv"] == ["hello"]
        pid = (await client.get(f"{API}/{other_name}")).json()["pid"]

        # Reload without "other", "viewer" changed: other's instance stops, viewer's keeps going.
        write_config(config, tmp_path, viewer(tmp_path, max_instances=3))
        result = (await client.post("server-proxy/api/reload")).json()
        assert result["templates"] == {"added": [], "removed": ["other"], "changed": ["viewer"], "unchanged": []}
        assert result["removed"] == [] and result["unchanged"] == ["echo"]  # instances are no configured servers
        names = [server["name"] for server in (await client.get(API)).json()["servers"]]
        assert names == ["echo", viewer_name]
        assert (await client.get(f"{other_name}/")).status_code == 404
        await wait_for(lambda: not pid_alive(pid), timeout=20)
        assert (await backend_view(client, viewer_name))["argv"][0] == "--logdir"
        assert (await create(client, {"word": "x"}, template="other")).status_code == 404
        templates_now = (await client.get("server-proxy/api/templates")).json()["templates"]
        assert [(t["name"], t["max_instances"]) for t in templates_now] == [("viewer", 3)]
        # Read again unchanged: nothing changes.
        result = (await client.post("server-proxy/api/reload")).json()
        assert result["templates"] == {"added": [], "removed": [], "changed": [], "unchanged": ["viewer"]}

        # A template that cannot work keeps its running definition; a SIGHUP reload the same.
        write_config(config, tmp_path, {"viewer": {"command": ["x", "{a}"], "params": {"a": {"type": "float"}}}})
        os.kill(proxy.process.pid, 1)
        await wait_for(lambda: "template 'viewer': parameter 'a': type 'float'" in proxy.output(), timeout=20)
        await wait_for(lambda: "its previous definition is kept" in proxy.output(), timeout=20)
        assert (await client.get("server-proxy/api/templates")).json()["templates"][0]["max_instances"] == 3
    assert proxy.stop() == 0
    assert f"template 'other' was removed by a reload: stopping its instance {other_name!r}" in proxy.output()


async def test_the_launcher_has_a_form_per_template_and_lists_instances_under_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    templates = viewer(tmp_path, description="One viewer per log directory")
    templates["viewer"]["params"]["mode"] = {"type": "string", "choices": ["fast", "full"], "default": "full"}
    templates["viewer"]["command"].append("{mode}")
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}}, templates=templates)
    async with proxy.client() as client:
        page = (await client.get("")).text
        assert "<form class='template-form' data-template='viewer' data-max='2'>" in page
        assert "name='logdir' required type='text' maxlength='1024'" in page
        assert "name='reload' type='number' step='1' min='1' max='3600' value='5'" in page
        assert "<option>fast</option><option selected>full</option>" in page
        assert "One viewer per log directory" in page
        name = (await create(client, {"logdir": "runs/exp1"})).json()["name"]
        page = (await client.get("")).text
        section = page[page.index("data-template='viewer'") :]
        assert f"data-server='{name}'" in section
        assert page.count(f"data-server='{name}'") == 1  # under its template only
        assert "data-server='echo'" not in section


async def test_a_template_name_with_markup_is_escaped_in_the_launcher(nursery: trio.Nursery) -> None:
    templates = {"t": {"command": [PY, ARGV_ENV, "{port}", "{a}"], "params": {"a": {"description": "<img src=x onerror=alert(1)>"}},
                       "launcher_entry": {"title": "<script>alert(1)</script>"}}}
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        page = (await client.get("")).text
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&lt;script&gt;" in page


async def test_shutdown_stops_instances(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write_config(config, tmp_path, viewer(tmp_path))
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)], cwd=str(tmp_path))
    proxy_processes.append(proxy)
    async with httpx.AsyncClient(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=30) as client:
        pid = (await create(client, {"logdir": "runs/exp1"})).json()["pid"]
    assert pid_alive(pid)
    assert proxy.stop() == 0
    assert not pid_alive(pid)


async def test_under_jupyterhub_creating_needs_the_access_scopes_of_the_server(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from trioproxy.cli import TrioProxy, build
    from trioproxy.server import run_app

    from .fakehub import FakeHub
    from .test_hub import PREFIX, hub_environ, use_environ

    hub = FakeHub()
    await nursery.start(hub.serve)
    port = free_port()
    use_environ(monkeypatch, hub_environ(hub, port))
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"ServerProxy": {"servers": {}, "templates": viewer(tmp_path)}}))
    app = TrioProxy()
    app.initialize(["--config", str(config)])
    app.load_file(str(config))
    hconfig, supervisors, asgi_app = build(app)
    hconfig.graceful_timeout = 0.2
    await nursery.start(run_app, asgi_app, hconfig)
    alice, bob = hub.issue_token("alice"), hub.issue_token("bob")
    body = {"template": "viewer", "args": {"logdir": "runs/exp1"}}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}{PREFIX}", timeout=30) as client:
        for refused in ({}, {"Authorization": f"token {bob}"}, {"Authorization": "token made-up"}):
            response = await client.post(API, json=body, headers=refused)
            assert response.status_code == 403, refused
        assert list(supervisors) == []
        response = await client.post(API, json=body, headers={"Authorization": f"token {alice}"})
        assert response.status_code == 201, response.text
        name = response.json()["name"]
        assert response.json()["url"] == f"{PREFIX}{name}/"
        # Bob cannot reach, stop or delete it either.
        assert (await client.get(f"{name}/", headers={"Authorization": f"token {bob}"})).status_code == 403
        assert (await client.delete(f"{API}/{name}", headers={"Authorization": f"token {bob}"})).status_code == 403
        assert name in supervisors
        view = await client.get(f"{name}/", headers={"Authorization": f"token {alice}"})
        assert view.json()["argv"][:2] == ["--logdir", str(tmp_path / "runs" / "exp1")]


async def test_concurrent_creations_of_the_same_arguments_make_one_instance(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, templates=viewer(tmp_path))
    answers: list[httpx.Response] = []
    async with proxy.client() as client:

        async def one() -> None:
            answers.append(await create(client, {"logdir": "runs/exp1"}))

        async with trio.open_nursery() as inner:
            for _ in range(6):
                inner.start_soon(one)
        assert sorted(answer.status_code for answer in answers) == [200] * 5 + [201], [a.text for a in answers]
        assert len({answer.json()["name"] for answer in answers}) == 1
        assert list(proxy.supervisors) == [answers[0].json()["name"]]
        assert proxy.supervisors[answers[0].json()["name"]].starts == 1


async def test_a_reload_never_removes_instances_and_a_configured_server_takes_its_name(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trioproxy.config import Reloader, make_server_process
    from trioproxy.instances import TemplateReloader

    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}}, templates=viewer(tmp_path))
    instances = proxy.app.extensions["trioproxy"].settings.instances
    servers: dict[str, Any] = {"echo": {"command": echo_command()}}
    load = lambda: {name: make_server_process(name, settings) for name, settings in servers.items()}  # noqa: E731
    reloader = TemplateReloader(Reloader(load, instances.configured), instances)
    async with proxy.client() as client:
        name = (await create(client, {"logdir": "runs/exp1"})).json()["name"]
        pid = proxy.supervisors[name].pid
        assert pid is not None
        result = await reloader.reload()
        assert result["removed"] == [] and result["unchanged"] == ["echo"] and "templates" not in result
        assert proxy.supervisors[name].pid == pid

        servers[name] = {"command": echo_command()}
        result = await reloader.reload()
        assert result["added"] == [name]
        assert name not in instances and not pid_alive(pid)
        assert (await client.get(f"{name}/x")).json()["target"] == "/x"  # the configured echo server
        assert "template" not in (await client.get(f"{API}/{name}")).json()
    assert f"the configured server {name!r} takes the name of an instance" in caplog.text


async def test_instances_get_their_name_and_sockets_of_their_own(nursery: trio.Nursery, tmp_path: Path) -> None:
    templates = {
        "named": {
            "command": [PY, ARGV_ENV, "{port}", "{base_url}{name}/", "{word}"],
            "environment": {"MARK": "{name}"},
            "params": {"word": {"pattern": "[a-z]+"}},
        },
        "sockets": {
            "command": [*echo_command(unix=True), "{word}"],
            "unix_socket": True,
            "params": {"word": {"pattern": "[a-z]+"}},
        },
    }
    proxy = await start_proxy(nursery, templates=templates, base_url="/pre/")
    async with proxy.client() as client:
        name = (await create(client, {"word": "abc"}, template="named")).json()["name"]
        view = await backend_view(client, name)
        assert view == {"argv": [f"/pre/{name}/", "abc"], "env": {"MARK": name}}
        sockets = []
        for word in ("one", "two"):
            response = await create(client, {"word": word}, template="sockets")
            assert response.status_code == 201, response.text
            sockets.append(response.json()["unix_socket"])
            assert (await client.get(f"{response.json()['name']}/x")).json()["target"] == "/x"
        assert sockets[0] != sockets[1] and all(sockets)


async def test_a_template_hidden_from_the_launcher_has_no_form(nursery: trio.Nursery, tmp_path: Path) -> None:
    templates = viewer(tmp_path)
    templates["viewer"]["launcher_entry"] = {"enabled": False}
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        assert "template-form" not in (await client.get("")).text
        name = (await create(client, {"logdir": "runs/exp1"})).json()["name"]
        assert f"data-server='{name}'" not in (await client.get("")).text
        entries = (await client.get("server-proxy/servers-info")).json()["server_processes"]
        assert [entry["launcher_entry"]["enabled"] for entry in entries] == [False]


async def test_instances_deleted_while_starting_leave_no_process_behind(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(
        "import http.server, os, sys, time\n"
        f"open({str(tmp_path / 'pids')!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "time.sleep(0.3)\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    templates = {"slow": {"command": [PY, str(script), "{port}", "{n}"], "params": {"n": "int"}, "timeout": 20, "max_instances": 10}}
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        for n in range(6):
            response = await create(client, {"n": n}, template="slow", params={"wait": "0"})
            assert response.status_code == 202, response.text
            name = response.json()["name"]
            if n % 2:  # odd ones are deleted once their process runs, even ones at once
                await wait_for(lambda: (tmp_path / "pids").exists() and len((tmp_path / "pids").read_text().split()) > n // 2, timeout=20)  # noqa: B023
            deleted = await client.delete(f"{API}/{name}")
            assert deleted.status_code == 200 and deleted.json()["removed"] is True
            assert name not in proxy.supervisors
        assert list(proxy.supervisors) == []
        pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()] if (tmp_path / "pids").exists() else []
        assert len(pids) >= 3
        assert [pid for pid in pids if pid_alive(pid)] == []


async def test_a_client_that_leaves_while_its_instance_starts_leaves_the_start_going(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The creation is the supervisors' task, not the request's: a client that gives up (its
    # connection closed mid-wait) ends only its own request.
    command = [PY, str(BACKENDS / "slow_start.py"), "{port}", "{seconds}", str(tmp_path / "pids")]
    templates = {"slow": {"command": command, "params": {"seconds": {"type": "int", "min": 1, "max": 10}}}}
    proxy = await start_proxy(nursery, templates=templates)
    async with proxy.client() as client:
        with pytest.raises(httpx.ReadTimeout):
            await create(client, {"seconds": 2}, template="slow", timeout=0.3)
        def ready() -> list[str]:
            return [name for name, supervisor in proxy.supervisors.items() if supervisor.state is State.READY]

        await wait_for(ready, timeout=60)
        assert ready()[0].startswith("slow-")
        assert (await client.get(f"{ready()[0]}/page")).status_code == 200
        # Asked again, it is the same instance, already there.
        again = await create(client, {"seconds": 2}, template="slow")
        assert again.status_code == 200 and again.json()["created"] is False
    assert len((tmp_path / "pids").read_text().split()) == 1
