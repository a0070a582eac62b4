"""The rules a definition's shape must keep that its types alone cannot state (names, abilities, sizes,
quantizations, file name templates and split parts, virtualenv, is_builtin, model_hub), needing no knowledge of
the registry or the disk; collected as FieldProblems that name the field at fault. The registry (validate.py)
adds what needs the disk and the registry's contents."""

from __future__ import annotations

import re

import msgspec

from zinfer.shared.models import (
    QUANTIZATION_RE,
    SERVED_ABILITIES,
    SIZE_RE,
    AudioFamily,
    Definition,
    EmbeddingFamily,
    FieldProblem,
    LLMFamily,
    RerankFamily,
    check_name,
)


def _size_problems(value: int | str | None, field: str) -> list[FieldProblem]:
    if value is None:
        return []
    if isinstance(value, bool) or (isinstance(value, int) and value <= 0):
        return [FieldProblem(field, f"{value!r} must be a positive integer or a string like \"1_8\"")]
    if isinstance(value, str) and not SIZE_RE.match(value):
        return [FieldProblem(field, f"{value!r} must be an integer or a string like \"1_8\" (meaning 1.8)")]
    return []


HUBS = ("huggingface",)


def _common_problems(definition: Definition, hubs_allowed: tuple[str, ...] = ()) -> list[FieldProblem]:
    """virtualenv, is_builtin and model_hub, the same on every type; `hubs_allowed`: the other hubs the
    hub_endpoints setting names."""
    problems = []
    if isinstance(definition, LLMFamily):
        env, builtin = definition.v2_extras.get("virtualenv"), definition.v2_extras.get("is_builtin")
        hubs = [(f"model_specs[{i}].model_hub", s.model_hub) for i, s in enumerate(definition.model_specs)]
    else:
        env = msgspec.to_builtins(definition.virtualenv) if definition.virtualenv is not None else None
        builtin = definition.is_builtin
        specs = getattr(definition, "model_specs", None) or []
        if isinstance(definition, AudioFamily):  # flat in both versions
            hubs = [("model_hub", definition.model_hub)]
        elif definition.version == 2:
            hubs = [(f"model_specs[{i}].model_hub", s.model_hub) for i, s in enumerate(specs)]
        else:  # the flat forms: the place is at the top
            hubs = [("model_hub", specs[0].model_hub if isinstance(definition, RerankFamily) else
                     definition.model_hub)]
    if env and env.get("packages"):
        problems.append(FieldProblem("virtualenv.packages", f"{env['packages']}: zinfer does not install packages "
                                     "per model; install them into zinfer's environment on every worker host "
                                     "(pip install ...), then register with an empty packages list"))
    if builtin:
        problems.append(FieldProblem("is_builtin", "true is for the models zinfer ships; a registration is a "
                                     "custom model: leave it out or false"))
    allowed = {*HUBS, *(h.lower() for h in hubs_allowed)}
    for field, hub in hubs:
        if hub is not None and hub.lower() not in allowed:
            problems.append(FieldProblem(field, f"{hub!r}: zinfer downloads from the Hugging Face Hub (model_hub "
                                         "\"huggingface\"; HF_ENDPOINT names a mirror) and from the hubs the "
                                         "hub_endpoints setting names (Hub-compatible endpoints); give model_uri for "
                                         "files you have"))
    return problems


def shape_problems(definition: Definition, hubs_allowed: tuple[str, ...] = ()) -> list[FieldProblem]:
    """Rules that types alone cannot state, that need no knowledge of the registry or the disk."""
    problems: list[FieldProblem] = []
    name_problem = check_name(definition.model_name)
    if name_problem:
        problems.append(name_problem)
    problems += _common_problems(definition, hubs_allowed)
    by_type = {EmbeddingFamily: _embedding_problems, RerankFamily: _rerank_problems, LLMFamily: _llm_problems,
               AudioFamily: _audio_problems}
    return problems + by_type[type(definition)](definition)


def _embedding_problems(definition: EmbeddingFamily) -> list[FieldProblem]:
    problems = []
    if not definition.model_uri and not definition.model_id:
        problems.append(FieldProblem("model_id", "required when model_uri is not given"))
    for i, spec in enumerate(definition.model_specs or ()):
        at = f"model_specs[{i}]"
        if spec.model_format == "pytorch":
            if spec.quantization != "none":
                problems.append(FieldProblem(f"{at}.quantization", "must be 'none' for pytorch"))
            continue
        if not QUANTIZATION_RE.fullmatch(spec.quantization) or spec.quantization == "none":
            problems.append(FieldProblem(f"{at}.quantization", f"{spec.quantization!r}: a {spec.model_format} "
                                         "spec names its file's quantization (letters, digits, '_', '.', '-')"))
        problems += _file_problems(at, spec.model_format, spec.model_file_name_template,
                                   spec.model_file_name_split_template, spec.quantization_parts, [spec.quantization])
    return problems


def _audio_problems(definition: AudioFamily) -> list[FieldProblem]:
    problems = []
    if not definition.model_uri and not definition.model_id:
        problems.append(FieldProblem("model_id", "required when model_uri is not given"))
    if definition.engine is not None and definition.engine.lower() != "transformers":
        problems.append(FieldProblem("engine", f"{definition.engine!r}: zinfer runs audio models on transformers "
                                     "(leave engine out, or \"transformers\")"))
    return problems


def _rerank_problems(definition: RerankFamily) -> list[FieldProblem]:
    return [FieldProblem("model_id" if definition.version == 1 else f"model_specs[{i}].model_id",
                         "required when model_uri is not given")
            for i, spec in enumerate(definition.model_specs) if not spec.model_uri and not spec.model_id]


def _llm_problems(definition: LLMFamily) -> list[FieldProblem]:
    problems = []
    if len(set(definition.model_ability)) != len(definition.model_ability):
        problems.append(FieldProblem("model_ability", "lists an ability twice"))
    if not set(definition.model_ability) & set(SERVED_ABILITIES):
        problems.append(FieldProblem("model_ability", "must include at least one of generate, chat, embed"))
    for i, spec in enumerate(definition.model_specs):
        problems += _llm_spec_problems(spec, f"model_specs[{i}]")
    return problems


def _llm_spec_problems(spec, at: str) -> list[FieldProblem]:
    problems = _size_problems(spec.model_size_in_billions, f"{at}.model_size_in_billions")
    if spec.model_format == "pytorch":
        bad = [q for q in spec.quantizations if q not in ("4-bit", "8-bit", "none")]
        if bad:
            problems.append(FieldProblem(
                f"{at}.quantizations", f"{bad} not allowed for pytorch; use '4-bit', '8-bit' or 'none'"))
    else:
        problems += _file_problems(at, spec.model_format, spec.model_file_name_template,
                                   spec.model_file_name_split_template, spec.quantization_parts, spec.quantizations)
    problems += _projector_problems(spec, at)
    bad_names = [q for q in spec.quantizations if not QUANTIZATION_RE.fullmatch(q)]
    if bad_names:
        problems.append(FieldProblem(f"{at}.quantizations", f"{bad_names[0]!r} must be letters, digits, "
                                     "'_', '.' and '-', starting with a letter or digit (it names a file)"))
    if len(set(spec.quantizations)) != len(spec.quantizations):
        problems.append(FieldProblem(f"{at}.quantizations", "lists a quantization twice"))
    if not spec.model_uri and not spec.model_id:
        problems.append(FieldProblem(f"{at}.model_id", "required when model_uri is not given"))
    return problems


FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def projector_name_ok(name: str) -> bool:
    """A multimodal projector's name: a .gguf file name (beside the model file), no path."""
    return name.endswith(".gguf") and FILE_NAME_RE.fullmatch(name) is not None


def _projector_problems(spec, at: str) -> list[FieldProblem]:
    """multimodal_projectors: GGUF file names (llama.cpp's mmproj files), beside a ggufv2 spec's model file."""
    names = spec.multimodal_projectors
    if names is None:
        return []
    field = f"{at}.multimodal_projectors"
    if spec.model_format != "ggufv2":
        return [FieldProblem(field, f"multimodal projectors are GGUF files for llama.cpp: a {spec.model_format} "
                             "spec takes none (a pytorch vision model's folder holds its own vision tower)")]
    if not names:
        return [FieldProblem(field, "lists no projector (leave it out, or name the mmproj .gguf files)")]
    for name in names:
        if not projector_name_ok(name):
            return [FieldProblem(field, f"{name!r} must be a .gguf file name beside the model file (letters, "
                                 "digits, '_', '.' and '-')")]
    if len(set(names)) != len(names):
        return [FieldProblem(field, "lists a projector twice")]
    return []


def _file_problems(at: str, model_format: str, template: str | None, split_template: str | None,
                   parts: dict[str, list[str]] | None, quantizations: list[str]) -> list[FieldProblem]:
    """A file spec's names: its template, and a split model's template and parts."""
    problems = []
    problem = template_problem(template, model_format)
    if problem:
        problems.append(FieldProblem(f"{at}.model_file_name_template", problem))
    if split_template is None and parts is None:
        return problems
    if split_template is None or not parts:
        missing = "model_file_name_split_template" if split_template is None else "quantization_parts"
        return problems + [FieldProblem(f"{at}.{missing}", "a split model gives both model_file_name_split_template "
                                        "and quantization_parts")]
    problem = template_problem(split_template.replace("{part}", "{quantization}"), model_format)
    if problem or "{part}" not in split_template:
        problems.append(FieldProblem(f"{at}.model_file_name_split_template",
                                     problem or "must contain {part} (and {quantization})"))
    for quantization, names in parts.items():
        where = f"{at}.quantization_parts.{quantization}"
        if quantization not in quantizations:
            problems.append(FieldProblem(where, f"{quantization!r} is not a quantization of this spec "
                                         f"({', '.join(quantizations)})"))
        bad = [n for n in names if not QUANTIZATION_RE.fullmatch(n)]
        if not names or bad:
            problems.append(FieldProblem(where, f"{bad[0]!r} must be letters, digits, '_', '.' and '-'" if bad
                                         else "lists no parts"))
    return problems


def template_problem(template: str | None, model_format: str) -> str | None:
    """What is wrong with a model_file_name_template, or None. Only the bare placeholder {quantization} is
    allowed: no other fields, no format spec ({quantization:>300000000} once cost the registry 900 MB)."""
    if not template:
        return f"required for {model_format}"
    if "{quantization}" not in template:
        return "must contain {quantization}"
    if "{" in template.replace("{quantization}", "") or "}" in template.replace("{quantization}", ""):
        return "may contain no braces besides the placeholder {quantization} (no other fields or format specs)"
    if "/" in template or "\\" in template or "\0" in template:
        return "is a file name template, not a path"
    if len(template) > 200:
        return f"is {len(template)} characters long; at most 200 allowed"
    return None
