"""Full validation of a definition: shape (types), names, families, prompt styles and model_uri on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from zinfer.services.registry import catalog
from zinfer.shared import toolcalls
from zinfer.shared.models import (
    MODEL_TYPES,
    AudioFamily,
    Definition,
    DefinitionError,
    EmbeddingFamily,
    FieldProblem,
    LLMFamily,
    LLMSpec,
    RerankFamily,
    decode_json_object,
    parse_as,
    spec_file_name,
    spec_file_names,
    uri_to_path,
)
from zinfer.shared.shape import shape_problems

__all__ = ["MODEL_TYPES", "already_registered", "check_model_type", "validate"]


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise DefinitionError([FieldProblem("model_type", f"{model_type!r} is not one of {list(MODEL_TYPES)}")])


def already_registered(model_type: str, name: str) -> str:
    return (f"{name!r} is already registered as a custom {model_type}; unregister it first "
            f"(zinfer unregister --model-type {model_type} --model-name {name}), or register with --force to "
            "replace it")


# Which hosts have these (folders, files): the workers', asked through the scheduler. (found, hosts asked)
Where = Callable[[list[str], list[str]], tuple[dict[str, list[str]], list[str]]]


class _Remote:
    """The paths this host lacks, looked up on the workers' hosts in one round (a model_uri is resolved on the
    host of the worker that loads it: on a mesh of several hosts the registry's own host need not have it)."""

    def __init__(self, where: Where | None):
        self.where = where
        self.dirs: list[str] = []
        self.files: list[str] = []
        self.found: dict[str, list[str]] = {}
        self.hosts: list[str] = []

    def ask(self) -> None:
        if self.where is not None and (self.dirs or self.files):
            self.found, self.hosts = self.where(self.dirs, self.files)

    def missing(self, path: str) -> str:
        elsewhere = (f" nor on any worker's host ({', '.join(self.hosts)})" if self.hosts
                     else " (and no worker could be asked)")
        return f"{path} does not exist on the registry's host{elsewhere}"


def _uri_field(family: Definition, i: int) -> str:
    """Where spec i's model_uri sits in the user's JSON."""
    if isinstance(family, EmbeddingFamily) or (isinstance(family, RerankFamily) and family.version == 1):
        return "model_uri"
    return f"model_specs[{i}].model_uri"


def _local_paths(family: Definition) -> list[tuple[str, str, bool, list[str]]]:
    """(field, path, wants a file, the template's file names) of each model_uri that names a local path."""
    out = []
    if isinstance(family, AudioFamily):
        path = uri_to_path(family.model_uri) if family.model_uri else None
        return [("model_uri", path, False, [])] if path else []
    specs = [family.spec.as_llm_spec()] if isinstance(family, EmbeddingFamily) else family.model_specs
    for i, spec in enumerate(specs):
        uri = spec.model_uri
        path = uri_to_path(uri) if uri else None
        if path is None:
            continue
        field = _uri_field(family, i)
        fmt = getattr(spec, "model_format", "pytorch")
        template = getattr(spec, "model_file_name_template", None)
        names = [n for q in spec.quantizations for n in spec_file_names(spec, q)] \
            if fmt != "pytorch" and template else []
        out.append((field, path, fmt != "pytorch", names))
    return out


def _remote_paths(family: Definition, where: Where | None) -> _Remote:
    remote = _Remote(where)
    for _field, path, want_file, names in _local_paths(family):
        if os.path.exists(path):
            continue
        if want_file:  # the file itself, or a folder of one file per quantization
            remote.files += [path, *(os.path.join(path, n) for n in names)]
        else:
            remote.dirs.append(path)
    remote.ask()
    return remote


def files_template(path: str) -> bool:
    """Whether model files on this host carry a chat template: a folder's chat_template.jinja (or named templates
    beside it) or tokenizer_config.json's chat_template; a GGUF file's tokenizer.chat_template."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "chat_template.jinja")) or \
                os.path.isdir(os.path.join(path, "additional_chat_templates")):
            return True
        config = os.path.join(path, "tokenizer_config.json")
        try:
            with open(config, "rb") as f:
                return bool(json.loads(f.read(MAX_CONFIG_BYTES)).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            return False
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
        return field is not None
    except Exception:  # not a GGUF file we can read: launch decides
        return False


MAX_CONFIG_BYTES = 16 << 20


def _may_have_template(spec) -> bool:
    """A spec whose files have a template, or whose files are not here to look at (a Hub id, another host's
    path): the launch checks those."""
    folder = uri_to_path(spec.model_uri) if spec.model_uri else None
    if folder is None or not os.path.exists(folder):
        return True
    if spec.model_format != "pytorch" and os.path.isdir(folder) and spec.model_file_name_template:
        return any(files_template(os.path.join(folder, spec_file_name(spec.model_file_name_template, q)))
                   for q in spec.quantizations)
    return files_template(folder)


def _uri_problems(uri: str | None, want_file: bool, field: str, remote: _Remote) -> list[FieldProblem]:
    if uri is None:
        return []
    path = uri_to_path(uri)
    if path is None:
        return [FieldProblem(field, f"{uri!r} must be file:///absolute/path or an absolute path")]
    if not os.path.exists(path):
        return [] if remote.found.get(path) else [FieldProblem(field, remote.missing(path))]
    if want_file and not os.path.isfile(path):
        return [FieldProblem(field, f"{path} is not a file (ggml/gguf specs name the model file itself)")]
    if not want_file and not os.path.isdir(path):
        return [FieldProblem(field, f"{path} is not a directory (pytorch and embedding models are folders)")]
    return []


def _llm_problems(family: LLMFamily, remote: _Remote) -> list[FieldProblem]:
    problems = []
    # model_family: a built-in family's name inherits its template, stops and abilities; any other name is the
    # person's own family (Xinference's current page asks for one, e.g. "my-custom-qwen-2.5").
    if isinstance(family.prompt_style, str) and family.prompt_style not in catalog.prompt_styles():
        problems.append(FieldProblem(
            "prompt_style", f"{family.prompt_style!r} is not a built-in prompt style; use one of "
            f"{sorted(catalog.prompt_styles())} or an object"))
    elif "chat" in family.model_ability and not problems:
        if catalog.resolve_prompt_style(family) is None and catalog.family_chat_template(family) is None \
                and not any(_may_have_template(spec) for spec in family.model_specs):
            problems.append(FieldProblem(
                "chat_template", "a model with the \"chat\" ability needs a chat template: give chat_template or "
                "prompt_style, inherit one from a built-in model_family, or point model_uri at files that have one "
                "(chat_template.jinja, tokenizer_config.json's chat_template, GGUF's tokenizer.chat_template)"))
    parser = family.v2_extras.get("tool_parser")
    if parser is not None and toolcalls.lookup(parser) is None:
        problems.append(FieldProblem("tool_parser", f"{parser!r} is not a tool-call format zinfer knows; use one of "
                                     f"{list(toolcalls.NAMES)} (or Xinference's names for them: "
                                     f"{sorted(set(toolcalls.PARSERS) - set(toolcalls.NAMES))})"))
    for i, spec in enumerate(family.model_specs):
        at = f"model_specs[{i}]"
        problems += _spec_file_problems(spec, at, remote) or _projector_files(spec, at)
    return problems


def _spec_file_problems(spec: LLMSpec, at: str, remote: _Remote) -> list[FieldProblem]:
    """A spec's model_uri: a pytorch folder; a gguf/ggml file, or a folder with every quantization's files (every
    part of a split one); here, or on a worker's host."""
    field = f"{at}.model_uri"
    folder = uri_to_path(spec.model_uri) if spec.model_uri else None
    if spec.model_format == "pytorch" or not folder or not spec.model_file_name_template:
        return _uri_problems(spec.model_uri, spec.model_format != "pytorch", field, remote)
    names = {q: spec_file_names(spec, q) for q in spec.quantizations}
    if not os.path.exists(folder) and not remote.found.get(folder):
        # Not here: a file on some worker's host, or a folder there with every quantization's files.
        if all(remote.found.get(os.path.join(folder, n)) for files in names.values() for n in files):
            return []
        return [FieldProblem(field, remote.missing(folder))]
    if os.path.isfile(folder):  # one file: the first part of a split model has the rest beside it
        split = next((files for files in names.values() if len(files) > 1 and files[0] == os.path.basename(folder)),
                     None)
        missing = [n for n in split or () if not os.path.isfile(os.path.join(os.path.dirname(folder), n))]
        if missing:
            return [FieldProblem(f"{at}.quantization_parts", f"{missing[0]} is not beside {folder}")]
        return _uri_problems(spec.model_uri, True, field, remote)
    if os.path.isdir(folder):
        # A folder works when it holds the files of every quantization (the template picks one at launch).
        for files in names.values():
            missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
            if missing and len(files) > 1:
                return [FieldProblem(f"{at}.quantization_parts", f"{folder} lacks {missing[0]} (part "
                                     f"{files.index(missing[0]) + 1} of {len(files)})")]
            if missing:
                return [FieldProblem(field, f"{folder} is a folder without {missing[0]}; a {spec.model_format} "
                                     "model_uri names the model file (or a folder holding one file per quantization)")]
        return []
    return _uri_problems(spec.model_uri, True, field, remote)


def _projector_files(spec: LLMSpec, at: str) -> list[FieldProblem]:
    """A local GGUF model's multimodal projectors, beside its file (in its folder). A model_uri this host lacks
    is checked on the worker's host at launch."""
    folder = uri_to_path(spec.model_uri) if spec.model_uri and spec.multimodal_projectors else None
    if folder is None or not os.path.exists(folder):
        return []
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
    missing = [n for n in spec.multimodal_projectors if not os.path.isfile(os.path.join(folder, n))]
    return [FieldProblem(f"{at}.multimodal_projectors", f"{missing[0]} is not in {folder}")] if missing else []


def looks_like(obj: dict) -> tuple[str, str] | None:
    """(the model type a definition's own fields show, which fields), or None when they leave it open: only
    the fields one type has count (an LLM's model_ability, an embedding's dimensions, a rerank's language)."""
    if "dimensions" in obj:
        return "embedding", "dimensions"
    abilities = obj.get("model_ability")
    if isinstance(abilities, list) and {"audio2text", "text2audio"} & set(map(str, abilities)):
        return "audio", f"model_ability {abilities}"
    if "model_ability" in obj or "model_lang" in obj:
        return "LLM", "model_ability" if "model_ability" in obj else "model_lang"
    if "language" in obj and "type" in obj:
        return "rerank", "language and type, and no dimensions"
    return None


def validate(model_type: str, model_json: str | bytes | dict, taken: set[str], where: Where | None = None,
             hubs_allowed: tuple[str, ...] = ()) -> Definition:
    """Parse and check a user's definition; `taken` holds the custom names registered for this type; `where`
    finds the model_uri paths this host lacks on the workers' hosts."""
    check_model_type(model_type)
    obj = decode_json_object(model_json)
    looks = looks_like(obj)
    if looks is not None and looks[0] != model_type:
        raise DefinitionError([FieldProblem("model_type", f"this is an {looks[0]} definition (it has {looks[1]}); "
                                            f"register it with --model-type {looks[0]}")])
    definition = parse_as(model_type, obj)
    problems = shape_problems(definition, hubs_allowed)
    name = definition.model_name
    if name in catalog.builtins(model_type):
        problems.append(FieldProblem("model_name", f"{name!r} is a built-in {model_type} model name"))
    elif name in taken:
        problems.append(FieldProblem("model_name", already_registered(model_type, name)))
    remote = _remote_paths(definition, where)
    if isinstance(definition, LLMFamily):
        problems += _llm_problems(definition, remote)
    elif isinstance(definition, EmbeddingFamily):
        if definition.spec.model_format != "pytorch":
            problems += _spec_file_problems(definition.spec.as_llm_spec(), "model_specs[0]", remote)
        else:
            field = "model_specs[0].model_uri" if definition.version == 2 else "model_uri"
            problems += _uri_problems(definition.model_uri, False, field, remote)
    elif isinstance(definition, AudioFamily):
        problems += _uri_problems(definition.model_uri, False, "model_uri", remote)
    else:
        for i, spec in enumerate(definition.model_specs):
            problems += _uri_problems(spec.model_uri, False, _uri_field(definition, i), remote)
    if problems:
        raise DefinitionError(problems)
    return definition
