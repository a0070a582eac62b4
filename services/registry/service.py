"""Registry handlers: register, list, get, unregister custom models; built-ins from configs/."""

from __future__ import annotations

import threading

import structlog

from zinfer.services.registry import catalog
from zinfer.services.registry.store import DefinitionStore
from zinfer.services.registry.validate import MODEL_TYPES, already_registered, check_model_type, validate
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound, Unavailable, ZinferError
from zinfer.shared.models import (
    Definition,
    DefinitionError,
    FieldProblem,
    LLMFamily,
    decode_json_object,
    definition_to_json,
    parse_as,
)
from zinfer.shared.shape import shape_problems
from zinfer.shared.transport import ServiceRuntime, handlers_of

log = structlog.get_logger()


def parse_persisted(model_type: str, hubs_allowed: tuple[str, ...] = ()):
    def parse(raw: bytes) -> Definition:
        obj = decode_json_object(raw)
        definition = parse_as(model_type, obj)
        problems = shape_problems(definition, hubs_allowed)
        if problems:
            raise DefinitionError(problems)
        return definition
    return parse


def _name_of(model: str) -> str | None:
    """The model_name a definition's JSON gives, if it can be read (validate() reports it when not)."""
    try:
        name = decode_json_object(model).get("model_name")
    except DefinitionError:
        return None
    return name if isinstance(name, str) else None


def summary(model_type: str, d: Definition, is_builtin: bool) -> p.RegistrationSummary:
    if model_type == "embedding":
        return p.RegistrationSummary(model_type=model_type, model_name=d.model_name, is_builtin=is_builtin,
                                     model_lang=list(d.language), dimensions=d.dimensions, max_tokens=d.max_tokens)
    if model_type == "rerank":
        return p.RegistrationSummary(model_type=model_type, model_name=d.model_name, is_builtin=is_builtin,
                                     model_format=["pytorch"], model_ability=["rerank"], model_lang=list(d.language),
                                     max_tokens=d.max_tokens, rerank_type=d.type)
    if model_type == "audio":
        return p.RegistrationSummary(model_type=model_type, model_name=d.model_name, is_builtin=is_builtin,
                                     model_format=["pytorch"], model_ability=list(d.model_ability),
                                     model_family=d.model_family, model_lang=list(d.language or []))
    formats = list(dict.fromkeys(s.model_format for s in d.model_specs))
    return p.RegistrationSummary(model_type=model_type, model_name=d.model_name, is_builtin=is_builtin,
                                 model_format=formats, model_ability=list(d.model_ability),
                                 model_family=d.model_family, model_lang=list(d.model_lang),
                                 context_length=d.context_length)


class Registry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.hubs = tuple(settings.hub_endpoints)  # model_hub names besides huggingface
        self.store = DefinitionStore(settings.home_path)
        self.lock = threading.Lock()
        self.custom: dict[str, dict[str, Definition]] = {}
        self.persisted: dict[str, set[str]] = {}
        self.corrupt: list[p.CorruptFile] = []
        for model_type in MODEL_TYPES:
            found, bad = self.store.load_all(model_type, parse_persisted(model_type, self.hubs))
            self.custom[model_type] = found
            self.persisted[model_type] = set(found)
            self.corrupt += bad
        log.info("registry_loaded", custom={t: len(v) for t, v in self.custom.items()}, corrupt=len(self.corrupt))
        self.bus: ServiceRuntime | None = None  # set by run_registry: calls go out as the registry

    def handlers(self) -> dict:
        return handlers_of(self, (p.RegisterModel, p.ListRegistrations, p.GetRegistration, p.UnregisterModel,
                                  p.RegistryStatus))

    # Everything but register and unregister (which may ask the scheduler) answers at once, in the I/O thread.
    inline = {p.ListRegistrations, p.GetRegistration, p.RegistryStatus}

    def register_model(self, msg: p.RegisterModel, ctx) -> p.Ok:
        self._check_type(msg.model_type)
        taken = set(self.custom[msg.model_type])
        definition = validate(msg.model_type, msg.model, taken - {_name_of(msg.model)} if msg.force else taken,
                              self._where, self.hubs)
        name = definition.model_name
        replaced = msg.force and name in taken
        if replaced:
            self._refuse_if_running(msg.model_type, name, "replace")
        with self.lock:
            if not msg.force and name in self.custom[msg.model_type]:  # registered meanwhile
                raise DefinitionError([FieldProblem("model_name", already_registered(msg.model_type, name))])
            if msg.persist:
                self.store.save(msg.model_type, definition)  # written before it is visible: all or nothing
                self.persisted[msg.model_type].add(name)
            elif name in self.persisted[msg.model_type]:  # replaced by one that lives in memory only
                self.store.delete(msg.model_type, name)
                self.persisted[msg.model_type].discard(name)
            self._publish(msg.model_type, name, definition)
        log.info("model_registered", model_type=msg.model_type, model_name=name, persist=msg.persist,
                 replaced=replaced)
        return p.Ok(message=f"{'replaced' if replaced else 'registered'} {msg.model_type} {name}")

    def _publish(self, model_type: str, name: str, definition: Definition | None) -> None:
        """Add, replace or (None) remove a custom definition, holding self.lock. The dict is copied and swapped,
        never changed in place: `list` and `get` answer on the I/O thread without the lock, each from the one
        dict it read (changed in place by a pool thread, a listing once raised "dictionary changed size")."""
        custom = dict(self.custom[model_type])
        if definition is None:
            custom.pop(name, None)
        else:
            custom[name] = definition
        self.custom[model_type] = custom

    def _where(self, dirs: list[str], files: list[str]) -> tuple[dict[str, list[str]], list[str]]:
        """Which workers' hosts have these paths (a model_uri this host lacks may be on a worker host)."""
        try:
            reply = self.bus.call(p.SCHEDULER, p.FindPaths(dirs=dirs, files=files), timeout=15.0)
        except ZinferError:  # no scheduler, or it could not ask: nobody was asked
            return {}, []
        return reply.found, reply.hosts

    def _refuse_if_running(self, model_type: str, model_name: str, verb: str) -> None:
        try:
            reply = self.bus.call(p.SCHEDULER, p.InstancesOf(model_type=model_type, model_name=model_name),
                                  timeout=10.0)
        except Unavailable:
            reply = p.UidList(model_uids=[])  # no scheduler running: nothing can be launched
        if reply.model_uids:
            raise Conflict(f"{model_name!r} has launched instances {reply.model_uids}; terminate them first, "
                           f"then {verb} it", field="model_name")

    def list_registrations(self, msg: p.ListRegistrations, ctx) -> p.Registrations:
        self._check_type(msg.model_type)
        items = [summary(msg.model_type, d, True) for d in catalog.builtins(msg.model_type).values()]
        items += [summary(msg.model_type, d, False) for d in self.custom[msg.model_type].values()]
        return p.Registrations(items=items)

    def lookup(self, model_type: str, model_name: str) -> tuple[Definition, bool]:
        self._check_type(model_type)
        builtin = catalog.builtins(model_type).get(model_name)
        if builtin is not None:
            return builtin, True
        definition = self.custom[model_type].get(model_name)
        if definition is None:
            raise NotFound(f"no {model_type} model named {model_name!r} is registered", field="model_name")
        return definition, False

    def get_registration(self, msg: p.GetRegistration, ctx) -> p.Registration:
        definition, is_builtin = self.lookup(msg.model_type, msg.model_name)
        reply = p.Registration(model_type=msg.model_type, is_builtin=is_builtin,
                               definition=definition_to_json(definition))
        if msg.resolved:  # typed, in the field of its type (llm, embedding, rerank, audio)
            # Self-contained for the workers: an LLM's family prompt style and chat template resolved here.
            setattr(reply, msg.model_type.lower(),
                    catalog.resolved(definition) if isinstance(definition, LLMFamily) else definition)
        return reply

    def unregister_model(self, msg: p.UnregisterModel, ctx) -> p.Ok:
        _definition, is_builtin = self.lookup(msg.model_type, msg.model_name)
        if is_builtin:
            raise InvalidRequest(f"{msg.model_name!r} is a built-in model and cannot be unregistered",
                                 field="model_name")
        if not msg.force:
            self._refuse_if_running(msg.model_type, msg.model_name, "unregister")
        with self.lock:
            if msg.model_name in self.persisted[msg.model_type]:
                self.store.delete(msg.model_type, msg.model_name)
                self.persisted[msg.model_type].discard(msg.model_name)
            self._publish(msg.model_type, msg.model_name, None)
        log.info("model_unregistered", model_type=msg.model_type, model_name=msg.model_name)
        return p.Ok(message=f"unregistered {msg.model_type} {msg.model_name}")

    def registry_status(self, msg, ctx) -> p.RegistryStatusReply:
        return p.RegistryStatusReply(
            builtin={t: len(catalog.builtins(t)) for t in MODEL_TYPES},
            custom={t: len(v) for t, v in self.custom.items()},
            corrupt=self.corrupt)

    @staticmethod
    def _check_type(model_type: str) -> None:
        try:
            check_model_type(model_type)
        except DefinitionError as exc:
            raise InvalidRequest(str(exc), field="model_type") from None


def run_registry(settings: Settings) -> None:
    registry = Registry(settings)
    runtime = ServiceRuntime(p.REGISTRY, settings, registry.handlers(), inline=Registry.inline)
    registry.bus = runtime
    runtime.install_signal_handlers()
    runtime.serve()
    return runtime.exit_code
