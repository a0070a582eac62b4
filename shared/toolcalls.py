"""Tool-call formats: one registry of parsers, as shared/engines.py is one registry of engines.

Each parser knows one way models write calls (Hermes' `<tool_call>{json}</tool_call>` as Qwen 2.5/3 do,
Llama 3's bare JSON, Mistral's `[TOOL_CALLS]`, the pythonic `[f(a=1)]` of Llama 4 and others): how to find calls
in a finished text, where a call starts in a stream (so no tag text reaches `content`), how to spot its format in
a chat template (a registration without `tool_parser` gets the one its template writes), and the Lark grammar
that makes constrained decoding write a call for `tool_choice: required` or a named function.

Parsing never raises: output that looks like a call but does not parse stays content. Nothing here runs code
from a model's output: pythonic calls are read with `ast` and their arguments with `ast.literal_eval`.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field

from zinfer.shared.payloads import Tool


@dataclass
class Call:
    name: str
    arguments: str  # a JSON object as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _call(obj) -> Call | None:
    """{"name": ..., "arguments"|"parameters": {...}} -> Call (None if it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list | None:
    """Every JSON value in `text`, one after another (separated by whitespace, ';' or ','), or None."""
    decoder = json.JSONDecoder()
    out, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n;,":
            i += 1
        if i >= n:
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


def _schema_of(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object"}


def _call_schema(tools: list[Tool], args_key: str = "arguments") -> dict:
    """A JSON schema that one call to one of `tools` matches: {"name": <const>, args_key: <its parameters>}."""
    options = [{"type": "object", "properties": {"name": {"const": t.function.name}, args_key: _schema_of(t)},
                "required": ["name", args_key], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _lark_json(schema: dict) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


class ToolParser:
    name = ""
    aliases: tuple[str, ...] = ()
    # In a stream, text from any of these on is held back as a possible call (until it parses, or the end).
    starts: tuple[str, ...] = ()
    # The whole answer is a call when it starts with one of these (after whitespace); held back to the end.
    whole_starts: tuple[str, ...] = ()
    # A held call is complete at one of these (formats without one run to the answer's end).
    ends: tuple[str, ...] = ()

    def detect(self, template: str) -> bool:
        """Whether a chat template writes calls this way (by default: it writes a call's opening tag)."""
        return any(start in template for start in self.starts)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(content, calls) of a finished answer; no calls -> (text, [])."""
        raise NotImplementedError

    def grammar(self, tools: list[Tool], parallel: bool, lit=json.dumps) -> str:
        """A Lark grammar (llguidance's dialect) for one call (or several, if parallel) to one of `tools`;
        `lit(tag)` spells a tag (a quoted string, or the model's own token for it where that is special)."""
        raise NotImplementedError


class Hermes(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, as Qwen 2.5 / Qwen 3 and Hermes write."""

    name = "hermes"
    aliases = ("qwen", "qwen2.5", "qwen3", "hermes2", "hermes3")
    starts = ("<tool_call>",)
    ends = ("</tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        first = text.find("<tool_call>")
        if first < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[first:]):
            values = _json_values(body)
            parsed = [_call(v) for v in values or []]
            if not values or None in parsed:
                return text, []
            calls += parsed
        return text[:first].rstrip() if calls else text, calls

    def grammar(self, tools: list[Tool], parallel: bool, lit=json.dumps) -> str:
        repeat = "+" if parallel else ""
        return (f'start: (call "\\n"?){repeat}\n'
                f'call: {lit("<tool_call>")} "\\n" body "\\n" {lit("</tool_call>")}\n'
                f"body: {_lark_json(_call_schema(tools))}\n")


class Llama3Json(ToolParser):
    """Llama 3.1-3.3: the answer is `{"name": ..., "parameters": {...}}` (maybe after `<|python_tag|>`, several
    separated by `;`)."""

    name = "llama3_json"
    aliases = ("llama3", "llama3.1", "llama3.2", "llama3.3", "llama3_1")
    whole_starts = ("{", "<|python_tag|>")

    def detect(self, template: str) -> bool:
        return "<|python_tag|>" in template or ('"parameters"' in template and "<|eom_id|>" in template)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        if not body.startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [_call(v) for v in values or []]
        if not calls or None in calls:
            return text, []
        return "", calls

    def grammar(self, tools: list[Tool], parallel: bool, lit=json.dumps) -> str:
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: {_lark_json(_call_schema(tools, 'parameters'))}\n"


class Mistral(ToolParser):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer `[TOOL_CALLS]name[ARGS]{...}`."""

    name = "mistral"
    starts = ("[TOOL_CALLS]",)
    _newer = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.:-]+)\s*\[ARGS\]")

    def parse(self, text: str) -> tuple[str, list[Call]]:
        first = text.find("[TOOL_CALLS]")
        if first < 0:
            return text, []
        rest = text[first:]
        calls: list[Call | None] = []
        if self._newer.match(rest):
            parts = self._newer.split(rest)[1:]  # name, args, name, args, ...
            for name, args in zip(parts[::2], parts[1::2], strict=False):
                values = _json_values(args)
                calls.append(_call({"name": name, "arguments": values[0]}) if values and len(values) == 1 else None)
        else:
            values = _json_values(rest[len("[TOOL_CALLS]"):])
            items = [v for value in values or [] for v in (value if isinstance(value, list) else [value])]
            calls = [_call(v) for v in items]
        if not calls or None in calls:
            return text, []
        return text[:first].rstrip(), calls

    def grammar(self, tools: list[Tool], parallel: bool, lit=json.dumps) -> str:
        more = ' (", " call)*' if parallel else ""
        return f'start: {lit("[TOOL_CALLS]")} "[" call{more} "]"\ncall: {_lark_json(_call_schema(tools))}\n'


class Pythonic(ToolParser):
    """`[get_weather(city="Paris"), f(x=1)]`: calls as a Python list of calls with literal keyword arguments."""

    name = "pythonic"
    aliases = ("llama4_pythonic", "olmo3")
    whole_starts = ("[",)

    def detect(self, template: str) -> bool:
        return "[func_name1(" in template or "func_name1(params_name1=" in template

    def parse(self, text: str) -> tuple[str, list[Call]]:
        body = text.strip()
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return text, []
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, []
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name | ast.Attribute):
                return text, []
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return text, []
            if len(args) != len(node.keywords):
                return text, []
            try:
                calls.append(Call(ast.unparse(node.func), json.dumps(args, ensure_ascii=False)))
            except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes, a complex number)
                return text, []
        return "", calls

    def grammar(self, tools: list[Tool], parallel: bool, lit=json.dumps) -> str:
        # Arguments as Python literals of JSON's kinds, named by the tool's parameters (values not typed).
        lines = []
        for i, tool in enumerate(tools):
            props = list((_schema_of(tool).get("properties") or {}))
            if props:
                args = " | ".join(f'"{p}=" value' for p in props)
                lines.append(f'f{i}: "{tool.function.name}(" (({args}) (", " ({args}))*)? ")"')
            else:
                lines.append(f'f{i}: "{tool.function.name}()"')
        call = " | ".join(f"f{i}" for i in range(len(tools)))
        more = ' (", " call)*' if parallel else ""
        return (f'start: "[" call{more} "]"\ncall: {call}\n' + "\n".join(lines) + "\n"
                'value: %json {"type": ["string", "number", "boolean", "object", "array"]} | "None"\n')


PARSERS: dict[str, ToolParser] = {}
for _parser in (Hermes(), Llama3Json(), Mistral(), Pythonic()):
    PARSERS[_parser.name] = _parser
    for _alias in _parser.aliases:
        PARSERS[_alias] = _parser
NAMES = tuple(sorted({p.name for p in PARSERS.values()}))


def lookup(name: str) -> ToolParser | None:
    return PARSERS.get(name.strip().lower())


def detect(template: str | None) -> ToolParser | None:
    """The format a chat template writes calls in (Hermes first: the most common among custom models)."""
    if not template:
        return None
    for parser in (PARSERS["hermes"], PARSERS["mistral"], PARSERS["pythonic"], PARSERS["llama3_json"]):
        if parser.detect(template):
            return parser
    return None
