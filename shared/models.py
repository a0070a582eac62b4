"""Model definition schema: Xinference's custom-model JSON (LLM v1 and v2, embedding, rerank in its flat and its
version 2 form, audio) as msgspec Structs.

The same Structs validate a user's JSON file and travel on the bus. `parse_as` turns user JSON into the internal
form (`LLMFamily` / `EmbeddingFamily` / `RerankFamily`), collecting every problem as a `FieldProblem` that names
the field; `definition_to_json` gives a definition back in the version it was registered with.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

MAX_DEFINITION_BYTES = 1 << 20  # a model definition is a few KB; a megabyte is already absurd
MAX_NAME_LENGTH = 256
# \A...\Z, not ^...$: "$" also matches before a final newline, which let "name\n" through.
NAME_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_-]*\Z"
NAME_RE = re.compile(NAME_PATTERN)
# Model names may also hold dots (Xinference's own template names "custom-qwen-2.5"); never "/" or a leading dot.
MODEL_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
SIZE_RE = re.compile(r"\A\d+(_\d+)?\Z")
QUANTIZATION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

ModelType = Literal["LLM", "embedding", "rerank", "audio"]
MODEL_TYPES: tuple[str, ...] = ("LLM", "embedding", "rerank", "audio")
AudioAbility = Literal["audio2text", "text2audio"]  # speech to text (Whisper-style), text to speech (VITS-style)
# Xinference's rerank types: `normal` runs on sentence-transformers' CrossEncoder; `unknown` is decided from the
# tokenizer when the model loads; the LLM-based ones (FlagEmbedding's LLM rerankers) zinfer does not run yet.
RerankType = Literal["normal", "LLM-based", "LLM-based layerwise", "unknown"]
RERANK_TYPES_SERVED = ("normal", "unknown")
ModelFormat = Literal["pytorch", "ggmlv3", "ggufv2"]
PositiveInt = Annotated[int, Meta(gt=0)]
NonEmptyStrList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
# Xinference v2 knows more abilities than zinfer serves; they are accepted so that its files register as they are.
Ability = Literal["generate", "chat", "embed", "tools", "vision", "audio", "omni", "reasoning", "hybrid"]
SERVED_ABILITIES = ("generate", "chat", "embed")


class PromptStyle(Struct, forbid_unknown_fields=True, kw_only=True):
    """How a chat is laid out as one prompt when no Jinja chat template is given."""

    style_name: str
    system_prompt: str = ""
    roles: list[str] = msgspec.field(default_factory=lambda: ["user", "assistant"])
    intra_message_sep: str = ""
    inter_message_sep: str = ""
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None


class LLMSpec(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One way to obtain the weights (internal form and version 1 JSON)."""

    model_format: ModelFormat
    model_size_in_billions: int | str
    quantizations: NonEmptyStrList
    model_id: str | None = None
    model_uri: str | None = None
    model_file_name_template: str | None = None
    # A model split into several files (llama.cpp's gguf-split): each quantization's parts, named by this template
    # with {quantization} and {part}; every part is downloaded, the first is the file llama.cpp opens.
    model_file_name_split_template: str | None = None
    quantization_parts: dict[str, list[str]] | None = None
    model_revision: str | None = None
    model_hub: str | None = None
    # A GGUF vision model's multimodal projectors (llama.cpp's mmproj files), file names beside the model file; a
    # launch picks one with its multimodal_projector option (default: the first, for a model with `vision`).
    multimodal_projectors: list[str] | None = None


class LLMSpecV2(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A version 2 spec: one quantization per spec."""

    model_format: ModelFormat
    model_size_in_billions: int | str
    quantization: Annotated[str, Meta(min_length=1)]
    model_id: str | None = None
    model_uri: str | None = None
    model_file_name_template: str | None = None
    model_file_name_split_template: str | None = None
    quantization_parts: dict[str, list[str]] | None = None
    model_revision: str | None = None
    model_hub: str | None = "huggingface"
    activated_size_in_billions: int | str | None = None
    multimodal_projectors: list[str] | None = None


class _LLMCommon(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    context_length: PositiveInt = 2048
    model_name: str
    model_lang: list[str]
    model_ability: Annotated[list[Ability], Meta(min_length=1)]
    model_description: str | None = None
    model_family: str = "other"
    prompt_style: str | PromptStyle | None = None
    chat_template: str | None = None
    stop_token_ids: list[int] | None = None
    stop: list[str] | None = None


class LLMFamilyV1(_LLMCommon, kw_only=True):
    version: Literal[1] = 1
    model_specs: Annotated[list[LLMSpec], Meta(min_length=1)]


class VirtualEnv(Struct, forbid_unknown_fields=True, kw_only=True):
    """Xinference's per-model virtualenv: zinfer runs every model in its own environment, so one that asks for
    packages is refused (shape_problems); the pip settings are kept as given."""

    packages: list[str] = []
    inherit_pip_config: bool | None = None
    index_url: str | None = None
    extra_index_url: str | list[str] | None = None
    find_links: str | list[str] | None = None
    trusted_host: str | list[str] | None = None
    no_build_isolation: bool | None = None


class LLMFamilyV2(_LLMCommon, kw_only=True):
    version: Literal[2]
    model_specs: Annotated[list[LLMSpecV2], Meta(min_length=1)]
    architectures: list[str] | None = None
    reasoning_start_tag: str | None = None
    reasoning_end_tag: str | None = None
    cache_config: dict[str, Any] | str | None = None
    virtualenv: VirtualEnv | None = None
    tool_parser: str | None = None
    is_builtin: bool | None = None


class LLMFamily(_LLMCommon, kw_only=True):
    """Internal form of an LLM definition, whichever version it came in."""

    version: int = 1
    model_specs: list[LLMSpec]
    v2_extras: dict[str, Any] = {}
    v2_spec_extras: list[dict[str, Any]] = []


class EmbeddingSpec(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A version 2 embedding spec (Xinference's current JSON): where the weights are. `pytorch` is a
    sentence-transformers folder; `ggufv2` a GGUF file (model_file_name_template with {quantization}, or split
    parts) that llama.cpp runs."""

    model_format: Literal["pytorch", "ggufv2"] = "pytorch"
    model_hub: str | None = None
    model_id: str | None = None
    model_uri: str | None = None
    model_revision: str | None = None
    quantization: str = "none"
    model_file_name_template: str | None = None
    model_file_name_split_template: str | None = None
    quantization_parts: dict[str, list[str]] | None = None

    def as_llm_spec(self) -> LLMSpec:
        """The same place as an LLM spec of its one quantization, which the file lookups and downloads take."""
        return LLMSpec(model_format=self.model_format, model_size_in_billions=1, quantizations=[self.quantization],
                       model_id=self.model_id, model_uri=self.model_uri,
                       model_file_name_template=self.model_file_name_template,
                       model_file_name_split_template=self.model_file_name_split_template,
                       quantization_parts=self.quantization_parts, model_revision=self.model_revision,
                       model_hub=self.model_hub)


class EmbeddingFamily(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """An embedding definition: Xinference's flat form (version 1) or its current one (version 2, `model_specs`;
    the first spec's place is copied to the flat fields, which the rest of zinfer reads)."""

    version: Literal[1, 2] = 1
    model_name: str
    dimensions: PositiveInt
    max_tokens: PositiveInt
    language: list[str]
    model_id: str | None = None
    model_uri: str | None = None
    model_revision: str | None = None
    model_hub: str | None = None
    model_description: str | None = None
    model_specs: list[EmbeddingSpec] | None = None
    cache_config: dict[str, Any] | str | None = None
    virtualenv: VirtualEnv | None = None
    is_builtin: bool | None = None

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec zinfer runs: the first of model_specs (launch puts the one it chose first), else the flat
        form's sentence-transformers folder."""
        if self.model_specs:
            return self.model_specs[0]
        return EmbeddingSpec(model_id=self.model_id, model_uri=self.model_uri, model_revision=self.model_revision,
                             model_hub=self.model_hub)


class RerankSpec(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One way to obtain a rerank model's weights (a version 2 spec; the flat form has one, implied)."""

    model_format: Literal["pytorch"] = "pytorch"
    model_id: str | None = None
    model_uri: str | None = None
    quantization: Literal["none"] = "none"
    model_revision: str | None = None
    model_hub: str | None = None


class _RerankCommon(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    model_name: str
    type: RerankType = "unknown"
    language: list[str]
    max_tokens: PositiveInt | None = None
    model_description: str | None = None
    cache_config: dict[str, Any] | str | None = None
    virtualenv: VirtualEnv | None = None
    is_builtin: bool | None = None


class RerankFamilyV1(_RerankCommon, kw_only=True):
    """Xinference's older, flat custom rerank JSON: the weights' place (a RerankSpec's fields but the format and
    quantization) at the top level; parse_rerank takes those apart."""

    version: Literal[1] = 1


_FLAT_SPEC = ("model_id", "model_uri", "model_revision", "model_hub")


class RerankFamily(_RerankCommon, kw_only=True):
    """A rerank definition: the internal form and Xinference's version 2 JSON (`model_specs`)."""

    version: Literal[1, 2] = 2
    model_specs: Annotated[list[RerankSpec], Meta(min_length=1)]

    @property
    def spec(self) -> RerankSpec:
        """The spec zinfer runs: the first (Xinference lists a hub's mirror after it)."""
        return self.model_specs[0]


class AudioFamily(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Xinference's custom audio JSON: one ability (audio2text: a transformers speech-recognition model such as
    Whisper; text2audio: a transformers text-to-speech model such as VITS / MMS-TTS), its files in one folder."""

    version: Literal[1, 2] = 2
    model_name: str
    model_family: str
    model_ability: Annotated[list[AudioAbility], Meta(min_length=1, max_length=1)]
    multilingual: bool | None = None  # False: an English-only model (no language or task is forced on it)
    language: list[str] | None = None
    # Xinference's options for its own engines' loading and decoding: kept as given (zinfer runs transformers' pipeline)
    default_model_config: dict[str, Any] | None = None
    default_transcription_config: dict[str, Any] | None = None
    engine: str | None = None  # "transformers" or left out
    # where the files are: a folder here (or on a worker's host), else a Hub repository
    model_uri: str | None = None
    model_id: str | None = None
    model_hub: str | None = None
    model_revision: str | None = None
    model_description: str | None = None
    virtualenv: VirtualEnv | None = None
    cache_config: dict[str, Any] | str | None = None
    is_builtin: bool | None = None

    @property
    def ability(self) -> str:
        return self.model_ability[0]


Definition = LLMFamily | EmbeddingFamily | RerankFamily | AudioFamily


class FieldProblem(msgspec.Struct, frozen=True):
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class DefinitionError(ValueError):
    """A definition that cannot be registered; `problems` lists each fault with its field."""

    def __init__(self, problems: list[FieldProblem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


_PATH_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")


_ENUM_RE = re.compile(r"^Invalid enum value (?P<value>.*)$")
_STEP_RE = re.compile(r"\.?(?:(?P<name>[^.\[\]]+)|\[(?P<index>\d+)\])")


def _type_at(root: type, path: str):
    """msgspec's type info at a path like `model_specs[0].model_format` under the struct `root` (None if the
    path leaves what the types describe)."""
    info = msgspec.inspect.type_info(root)
    for step in _STEP_RE.finditer(path):
        if isinstance(info, msgspec.inspect.UnionType):  # X | None, or v1 | v2: the first container or struct
            info = next((t for t in info.types if isinstance(t, msgspec.inspect.StructType | msgspec.inspect.ListType
                                                                | msgspec.inspect.DictType)), None)
        if step.group("name") is not None and isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == step.group("name")), None)
        elif step.group("index") is not None and isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return None
    return info


def _literal_values(info) -> list | None:
    if isinstance(info, msgspec.inspect.LiteralType):
        return list(info.values)
    if isinstance(info, msgspec.inspect.UnionType):
        for t in info.types:
            if isinstance(t, msgspec.inspect.LiteralType):
                return list(t.values)
    return None


def closest_name(name: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of `choices`, or ""."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def problem_from_validation(exc: msgspec.ValidationError | msgspec.DecodeError,
                            root: type | None = None) -> FieldProblem:
    """Turn msgspec's "Expected `int` - at `$.a[0].b`" into FieldProblem("a[0].b", "Expected `int`").

    Given the struct type that was decoded (`root`), an enum error lists the valid values and an unknown field
    names the closest valid one."""
    m = _PATH_RE.match(str(exc))
    msg, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    unknown = _UNKNOWN_RE.match(msg)
    if unknown:
        name = unknown.group("name")
        parent = _type_at(root, path) if root is not None else None
        hint = closest_name(name, [f.encode_name for f in parent.fields]) \
            if isinstance(parent, msgspec.inspect.StructType) else ""
        return FieldProblem(f"{path}.{name}" if path else name, "unknown field" + hint)
    missing = _MISSING_RE.match(msg)
    if missing:
        return FieldProblem(f"{path}.{missing.group('name')}" if path else missing.group("name"),
                            "required field is missing")
    enum = _ENUM_RE.match(msg)
    if enum and root is not None:
        values = _literal_values(_type_at(root, path))
        if values:
            msg = f"invalid value {enum.group('value')}; valid values: {', '.join(map(str, values))}"
    return FieldProblem(path, msg)


def check_name(name: str, field: str = "model_name") -> FieldProblem | None:
    if not name:
        return FieldProblem(field, "must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        return FieldProblem(field, f"is {len(name)} characters long; at most {MAX_NAME_LENGTH} allowed")
    if not MODEL_NAME_RE.fullmatch(name):
        return FieldProblem(
            field, f"{name!r} must start with a letter or digit and contain only letters, digits, '_', '-' and '.'"
        )
    return None


def decode_json_object(text: str | bytes | dict) -> dict:
    """User JSON (text or an already parsed dict) -> dict, with size and syntax errors as problems."""
    if isinstance(text, dict):
        return text
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_DEFINITION_BYTES:
        raise DefinitionError(
            [FieldProblem("", f"definition is {len(raw)} bytes; at most {MAX_DEFINITION_BYTES} allowed")]
        )
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise DefinitionError([FieldProblem("", f"not valid JSON: {exc}")]) from None
    if not isinstance(obj, dict):
        raise DefinitionError([FieldProblem("", f"expected a JSON object, got {type(obj).__name__}")])
    return obj


def size_in_billions(value: int | float | str) -> float:
    return float(value.replace("_", ".")) if isinstance(value, str) else float(value)


def _convert(obj: dict, kind: type) -> Any:
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        raise DefinitionError([problem_from_validation(exc, kind)]) from None


def parse_llm(obj: dict) -> LLMFamily:
    """Validate the shape of an LLM definition (v1 or v2) and return its internal form."""
    version = obj.get("version", 1)
    if version == 2:
        v2 = _convert(obj, LLMFamilyV2)
        specs, spec_extras = [], []
        for s in v2.model_specs:
            specs.append(LLMSpec(
                model_format=s.model_format, model_size_in_billions=s.model_size_in_billions,
                quantizations=[s.quantization], model_id=s.model_id, model_uri=s.model_uri,
                model_file_name_template=s.model_file_name_template, model_revision=s.model_revision,
                model_file_name_split_template=s.model_file_name_split_template,
                quantization_parts=s.quantization_parts, model_hub=s.model_hub,
                multimodal_projectors=s.multimodal_projectors))
            spec_extras.append({"activated_size_in_billions": s.activated_size_in_billions}
                               if s.activated_size_in_billions is not None else {})
        common = {f: getattr(v2, f) for f in _LLMCommon.__struct_fields__}
        extras = {f: msgspec.to_builtins(getattr(v2, f))
                  for f in ("architectures", "reasoning_start_tag", "reasoning_end_tag", "cache_config", "virtualenv",
                            "tool_parser", "is_builtin")
                  if getattr(v2, f) is not None}
        return LLMFamily(**common, version=2, model_specs=specs, v2_extras=extras, v2_spec_extras=spec_extras)
    if version != 1:
        raise DefinitionError([FieldProblem("version", f"{version!r} is not supported; expected 1 or 2")])
    v1 = _convert(obj, LLMFamilyV1)
    common = {f: getattr(v1, f) for f in _LLMCommon.__struct_fields__}
    return LLMFamily(**common, version=1, model_specs=v1.model_specs)


def parse_embedding(obj: dict) -> EmbeddingFamily:
    family = _convert(obj, EmbeddingFamily)
    if family.version == 2 or family.model_specs is not None:
        if not family.model_specs:
            raise DefinitionError([FieldProblem("model_specs", "version 2 needs model_specs: a non-empty list")])
        flat = [f for f in _FLAT_SPEC if getattr(family, f) is not None]
        if flat:
            raise DefinitionError([FieldProblem(flat[0], "version 2 gives it in model_specs, not at the top")])
        family.version = 2
        spec = family.model_specs[0]  # the one zinfer runs (a hub's mirror comes after it)
        for f in _FLAT_SPEC:
            setattr(family, f, getattr(spec, f))
    return family


def parse_rerank(obj: dict) -> RerankFamily:
    """A rerank definition in either of Xinference's forms: version 2 with model_specs, or the flat one."""
    version = obj.get("version", 2 if "model_specs" in obj else 1)
    if version == 2:
        return _convert(obj, RerankFamily)
    if version != 1:
        raise DefinitionError([FieldProblem("version", f"{version!r} is not supported; expected 1 or 2")])
    flat = _convert({k: v for k, v in obj.items() if k not in _FLAT_SPEC}, RerankFamilyV1)
    spec = _convert({k: v for k, v in obj.items() if k in _FLAT_SPEC}, RerankSpec)
    common = {f: getattr(flat, f) for f in _RerankCommon.__struct_fields__}
    return RerankFamily(**common, version=1, model_specs=[spec])


PARSERS = {"LLM": parse_llm, "embedding": parse_embedding, "rerank": parse_rerank,
           "audio": lambda obj: _convert(obj, AudioFamily)}


def parse_as(model_type: str, obj: dict) -> Definition:
    """The internal form of a definition of this model type (one of MODEL_TYPES)."""
    return PARSERS[model_type](obj)


def spec_file_names(spec: LLMSpec, quantization: str) -> list[str]:
    """The files of one quantization of a gguf/ggml spec: its split parts in order (llama.cpp opens the first and
    finds the rest beside it), else the one file of model_file_name_template."""
    parts = (spec.quantization_parts or {}).get(quantization)
    if spec.model_file_name_split_template and parts:
        named = spec.model_file_name_split_template.replace("{quantization}", quantization)
        return [named.replace("{part}", part) for part in parts]
    return [spec_file_name(spec.model_file_name_template or "", quantization)]


def spec_file_name(template: str, quantization: str) -> str:
    """The model file of one quantization: plain substitution, never str.format on user text."""
    return template.replace("{quantization}", quantization)


def definition_to_json(definition: Definition) -> dict[str, Any]:
    """The definition as the user's JSON object, in the version it was registered with."""
    if isinstance(definition, EmbeddingFamily):
        out = msgspec.to_builtins(definition)
        if definition.version == 2:  # the place is in model_specs, as it came
            for f in _FLAT_SPEC:
                out.pop(f, None)
            for spec in out["model_specs"]:
                spec.setdefault("model_format", "pytorch")
                spec.setdefault("quantization", "none")
            out["version"] = 2
        return out
    if isinstance(definition, AudioFamily):
        return {**msgspec.to_builtins(definition), "version": definition.version}
    if isinstance(definition, RerankFamily):
        out = msgspec.to_builtins(definition)
        if definition.version == 1:  # the flat form it came in
            spec = out.pop("model_specs")[0]
            spec.pop("model_format", None)
            spec.pop("quantization", None)
            out.update(spec)
        else:
            for spec in out["model_specs"]:
                spec.setdefault("model_format", "pytorch")
                spec.setdefault("quantization", "none")
        out.setdefault("type", definition.type)
        out["version"] = definition.version
        return out
    out = msgspec.to_builtins(definition)
    out.pop("v2_extras", None)
    out.pop("v2_spec_extras", None)
    if definition.version == 2:
        specs = []
        extras = definition.v2_spec_extras or [{}] * len(out["model_specs"])
        for spec, extra in zip(out["model_specs"], extras, strict=True):
            spec["quantization"] = spec.pop("quantizations")[0]
            spec.update(extra)
            specs.append(spec)
        out["model_specs"] = specs
        out.update(definition.v2_extras)
    out["version"] = definition.version
    return out


def uri_to_path(uri: str) -> str | None:
    """`file:///x` or `/x` -> '/x'; anything else (a URL, a relative path) -> None."""
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        return path if path.startswith("/") else None
    return uri if uri.startswith("/") else None
