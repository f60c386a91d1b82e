"""Instances on demand: servers made from a template by an API call, and their lifetimes.

:class:`Instances` keeps the templates (:mod:`trioproxy.templates`) and the instances made
from them. An instance is an ordinary server in :class:`~trioproxy.supervisor.Supervisors`
(so it is routed, listed, controlled, culled and shut down like any other); what is particular
to it lives here:

- :meth:`Instances.create` checks the arguments, names the instance from them (the same
  arguments name the same instance), reserves its place under ``max_instances`` before
  anything is awaited (so concurrent creations cannot exceed it), adds its server and starts it.
- A watcher task per instance removes it once it is stopped (a stop through the API, idle
  culling, an exit the restart policy does not restart): its URL is a 404 from then on. A
  restart holds it (:meth:`Instances.keeping`), so the stopped moment inside a restart does not
  count. A failed instance stays listed, with its reason, until it is stopped or deleted.
- Reloads: :meth:`Instances.stage` takes the templates read with the servers, and
  :class:`TemplateReloader` applies them after the servers' reload: a removed template's
  instances are stopped (logged), a changed one's keep running with the settings they were
  made with, and a template that cannot be used keeps its old definition. The reloader of the
  servers sees only configured servers (:class:`ConfiguredServers`), never instances.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from .config import ConfigError, ReloadError, ServerProcess, check_server_name, make_server_process
from .paths import name_clash
from .registry import run_logged
from .supervisor import ServerSupervisor, ServerUnavailable, State, Supervisors
from .templates import ArgumentError, Template, TemplateConfigError, parse_template, sample_value

log = logging.getLogger("trioproxy.instances")


class InstanceRefused(Exception):
    """A creation that cannot be done: ``status`` (400, 404, 409, 429, 503) and a message."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class Instance:
    name: str
    template: str
    args: dict[str, str]
    keep: int = 0  # actions under way (a restart) that stop it only to start it again
    poke: trio.Event = field(default_factory=trio.Event)
    watcher: trio.CancelScope | None = None
    added: trio.Event = field(default_factory=trio.Event)  # its server is there (or it failed)


def check_template(template: Template, parent: Any = None) -> None:
    """The template's server options, checked as a server's are, on a sample instance."""
    values = {name: sample_value(param) for name, param in template.params.items()}
    name = template.instance_names(values)[0]
    try:
        check_server_name(name)
        make_server_process(name, template.server_settings(name, values), parent=parent, strict=True, source=f"template {template.name!r}")
    except ConfigError as exc:
        raise TemplateConfigError(f"template {template.name!r}: {exc}") from None


def load_templates(raw: Any, *, parent: Any = None, cwd: str | None = None) -> tuple[dict[str, Template], dict[str, str]]:
    """``c.ServerProxy.templates`` parsed: the usable templates, and why the others are not
    (each logged). Raises ConfigError if it is not a dict at all."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"ServerProxy.templates must be a dict of templates, got {type(raw).__name__}")
    templates: dict[str, Template] = {}
    invalid: dict[str, str] = {}
    for name, settings in raw.items():
        try:
            template = parse_template(name, settings, cwd=cwd)
            check_template(template, parent)
        except TemplateConfigError as exc:
            log.error("%s; it is not offered", exc)
            invalid[str(name)] = str(exc)
            continue
        templates[template.name] = template
    return templates, invalid


class Instances:
    """The templates, and the instances made from them, over the servers' supervisors."""

    def __init__(self, supervisors: Supervisors, templates: Mapping[str, Template] | None = None, parent: Any = None) -> None:
        self.supervisors = supervisors
        self.templates: dict[str, Template] = dict(templates or {})
        self.invalid: dict[str, str] = {}
        self._parent = parent
        self._instances: dict[str, Instance] = {}
        self._staged: tuple[dict[str, Template], dict[str, str]] | None = None
        self._staged_parent: Any = None
        self.configured = ConfiguredServers(self)

    def __contains__(self, name: object) -> bool:
        return name in self._instances

    def of(self, template: str) -> list[str]:
        return [name for name, instance in self._instances.items() if instance.template == template]

    def describe(self, name: str) -> dict[str, Any] | None:
        """What the API adds to an instance's status: its template and arguments."""
        instance = self._instances.get(name)
        if instance is None:
            return None
        return {"template": instance.template, "args": dict(instance.args)}

    # -- creating ---------------------------------------------------------------------------

    async def create(self, template_name: Any, args: Any, *, wait: bool = True) -> tuple[str, bool]:
        """Make (or find) the instance of ``template_name`` for ``args`` and start it.

        Returns its name and whether it is new. Raises InstanceRefused; with ``wait``, a
        ServerUnavailable when its first start fails (the new instance is removed then).
        """
        if not isinstance(template_name, str):
            raise InstanceRefused(400, "'template' must be the name of a template (a string).")
        template = self.templates.get(template_name)
        if template is None:
            known = ", ".join(sorted(self.templates)) or "none are configured"
            raise InstanceRefused(404, f"No template named {template_name!r} (templates: {known}).")
        try:
            values = template.arguments(args)
        except ArgumentError as exc:
            raise InstanceRefused(400, f"{exc}.", exc.param) from None
        name = self._name_for(template, values)
        existing = self._instances.get(name)
        if existing is not None:
            await existing.added.wait()  # a creation of the same arguments may be under way
            if self._instances.get(name) is not existing:
                raise InstanceRefused(503, f"The instance {name!r} was removed meanwhile; try again.")
            await self.supervisors[name].start(wait=wait)
            return name, False
        count = len(self.of(template.name))
        if count >= template.max_instances:
            raise InstanceRefused(
                429,
                f"Template {template.name!r} has {count} instance{'s' if count != 1 else ''} already "
                f"(max_instances: {template.max_instances}); stop one first.",
            )
        process = self._process(template, name, values)
        instance = self._instances[name] = Instance(name, template.name, values)  # reserved, before any await
        try:
            await self.supervisors.add(process)
            supervisor = self.supervisors[name]
            await supervisor.start(wait=False)
            self._watch(instance)
        except BaseException:
            self._instances.pop(name, None)
            if name in self.supervisors and self.supervisors[name].process is process:
                with trio.CancelScope(shield=True):
                    await self.supervisors.remove(name)
            raise
        finally:
            instance.added.set()
        log.info("instance %r of template %r created: %s", name, template.name, values)
        if wait:
            try:
                await supervisor.ensure_ready()
            except ServerUnavailable:
                log.warning("instance %r: its first start failed; removing it", name)
                with trio.CancelScope(shield=True):
                    await self.remove(name, why="its first start failed")
                raise
        return name, True

    def _name_for(self, template: Template, values: Mapping[str, str]) -> str:
        for name in template.instance_names(values):
            instance = self._instances.get(name)
            if instance is not None and instance.template == template.name and instance.args == values:
                return name
            if instance is None and name not in self.supervisors and not self._path_taken(name):
                return name
        raise InstanceRefused(409, f"Every name for this instance of {template.name!r} is taken by another server.")

    def _path_taken(self, name: str) -> bool:
        """Whether a configured server's ``path`` or alias covers the URL an instance ``name`` would have."""
        return name_clash(name, (supervisor.process for supervisor in self.supervisors.values())) is not None

    def _process(self, template: Template, name: str, values: Mapping[str, str]) -> ServerProcess:
        try:
            check_server_name(name)
            return make_server_process(name, template.server_settings(name, values), parent=self._parent, strict=True, source=f"template {template.name!r}")
        except ConfigError as exc:
            # A value the server options refuse (the checks at load time used sample values).
            log.warning("instance of template %r refused: %s", template.name, exc)
            raise InstanceRefused(400, f"These arguments make options that cannot work: {exc}.") from None

    # -- lifetimes --------------------------------------------------------------------------

    def _watch(self, instance: Instance) -> None:
        scope = instance.watcher = trio.CancelScope()

        async def watch() -> None:
            with scope:
                await self._remove_once_stopped(instance)

        self.supervisors.spawn(watch)

    async def _remove_once_stopped(self, instance: Instance) -> None:
        name = instance.name
        supervisor = self.supervisors[name]
        while self._instances.get(name) is instance and self.supervisors.get(name) is supervisor:
            state = supervisor.state
            if state is State.STOPPED and not instance.keep and not supervisor.active:
                await self._remove(instance, supervisor.reason or "stopped")
                return
            await self._next_change(supervisor, state, instance.poke)

    async def _next_change(self, supervisor: ServerSupervisor, state: State, poke: trio.Event) -> None:
        """Until the state changes, the instance is poked, or (stopped) its last use ends."""
        async with trio.open_nursery() as nursery:

            async def first(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            others = [other for other in State if other is not state]
            nursery.start_soon(first, partial(supervisor.wait_for_state, *others))
            nursery.start_soon(first, poke.wait)
            if state is State.STOPPED:  # in use, or held: look again when that ends
                nursery.start_soon(first, supervisor.wait_until_unused)

    @contextlib.contextmanager
    def keeping(self, name: str) -> Iterator[None]:
        """Hold the instance ``name`` (if it is one) while it is stopped only to be started
        again (a restart)."""
        instance = self._instances.get(name)
        if instance is None:
            yield
            return
        instance.keep += 1
        try:
            yield
        finally:
            instance.keep -= 1
            self._poke(instance)

    def _poke(self, instance: Instance) -> None:
        poke, instance.poke = instance.poke, trio.Event()
        poke.set()

    async def remove(self, name: str, *, why: str = "removed") -> None:
        """Stop the instance and forget it (its URL is a 404 from now on)."""
        instance = self._instances.get(name)
        if instance is None:
            return
        if instance.watcher is not None:
            instance.watcher.cancel()
        await self._remove(instance, why)

    async def _remove(self, instance: Instance, why: str) -> None:
        name = instance.name
        if self._instances.get(name) is not instance:
            return
        del self._instances[name]
        log.info("instance %r of template %r removed (%s)", name, instance.template, why)
        if name in self.supervisors:
            await self.supervisors.remove(name)

    def forget(self, name: str) -> None:
        """The server ``name`` is no longer an instance (a configured server took the name)."""
        instance = self._instances.pop(name, None)
        if instance is not None and instance.watcher is not None:
            instance.watcher.cancel()

    # -- reloads ----------------------------------------------------------------------------

    def stage(self, raw: Any, *, parent: Any = None) -> None:
        """Templates read with the servers in a reload, applied by :meth:`apply_staged`.
        Raises ConfigError (the reload changes nothing) if they are not a dict at all."""
        self._staged = load_templates(raw, parent=parent)
        self._staged_parent = parent

    def unstage(self) -> None:
        self._staged = None

    async def apply_staged(self) -> dict[str, Any] | None:
        """Bring the templates in line with the staged ones; what changed, or None if no
        templates were staged."""
        if self._staged is None:
            return None
        new, invalid = self._staged
        self._staged = None
        old = self.templates
        kept = dict(new)
        for name in invalid:
            if name in old:
                kept[name] = old[name]
                invalid[name] += " (its previous definition is kept)"
                log.error("reload: %s", invalid[name])
        removed = [name for name in old if name not in kept]
        changed = [name for name in kept if name in old and not _same(kept[name], old[name])]
        for name in changed:
            if self.of(name):
                log.info("template %r changed: its instances keep their settings; new instances get the new ones", name)
        self.templates, self.invalid = kept, invalid
        self._parent = self._staged_parent
        async with trio.open_nursery() as nursery:
            for template in removed:
                for instance in self.of(template):
                    log.warning("template %r was removed by a reload: stopping its instance %r", template, instance)
                    # Each its own boundary: one that fails to stop is logged, the others still stop.
                    why = f"template {template!r} removed by a reload"
                    nursery.start_soon(run_logged, f"stopping instance {instance!r}", partial(self.remove, instance, why=why))
        return {
            "added": [name for name in kept if name not in old],
            "removed": removed,
            "changed": changed,
            "unchanged": [name for name in kept if name in old and name not in changed],
            **({"invalid": invalid} if invalid else {}),
        }


def _same(new: Template, old: Template) -> bool:
    try:
        return bool(new.fingerprint == old.fingerprint)
    except Exception:  # a default argument whose == raises: call it changed
        return False


class ConfiguredServers:
    """:class:`Supervisors` as the servers' reloader sees it: configured servers only, so
    that a reload never takes an instance for a server the configuration removed."""

    def __init__(self, instances: Instances) -> None:
        self._instances = instances

    @property
    def _supervisors(self) -> Supervisors:
        return self._instances.supervisors

    def processes(self) -> dict[str, ServerProcess]:
        return {name: process for name, process in self._supervisors.processes().items() if name not in self._instances}

    async def add(self, process: ServerProcess) -> None:
        if process.name in self._instances:
            log.warning("reload: the configured server %r takes the name of an instance, which is stopped", process.name)
            await self._instances.remove(process.name, why="a configured server takes its name")
        await self._supervisors.add(process)

    async def remove(self, name: str) -> None:
        await self._supervisors.remove(name)

    async def replace(self, process: ServerProcess, *, when_idle: bool = False) -> None:
        await self._supervisors.replace(process, when_idle=when_idle)

    def waiting_for_idle(self) -> list[str]:
        return self._supervisors.waiting_for_idle()


class TemplateReloader:
    """The servers' reloader, then the templates read with them (see :meth:`Instances.stage`)."""

    def __init__(self, reloader: Any, instances: Instances) -> None:
        self._reloader = reloader
        self._instances = instances
        self._lock: trio.Lock | None = None

    async def reload(self, *, when_idle: bool = False) -> dict[str, Any]:
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            return await self._reload(when_idle)

    async def _reload(self, when_idle: bool) -> dict[str, Any]:
        self._instances.unstage()
        try:
            result = await self._reloader.reload(when_idle=when_idle)
        except ReloadError:
            await self._apply()  # the other servers' changes were applied: the templates' too
            raise
        except BaseException:
            self._instances.unstage()
            raise
        templates = await self._apply()
        if templates is not None and any(templates.values()):  # said only where there are any
            result = {**result, "templates": templates}
        return result

    async def _apply(self) -> dict[str, Any] | None:
        try:
            return await self._instances.apply_staged()
        except Exception as exc:
            log.exception("reload: applying the templates failed")
            raise ReloadError(f"the templates could not be applied: {type(exc).__name__}: {exc}") from None
