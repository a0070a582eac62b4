"""Constrained decoding on both engines with llguidance (batched token masks computed in Rust).

A request's constraint (response_format json_object / json_schema, guided_json / guided_regex / guided_choice /
guided_grammar, or the tool-call grammar that `tool_choice: required` or a named function asks for) becomes a
`Constraint`: llguidance's grammar text plus the request field to blame. Each backend owns one `Grammars`: its
vocabulary as llguidance's tokenizer (built once, lazily: about a second for a large vocabulary), and compiled
grammars cached by their text, so a second request with the same schema compiles nothing (`compiles` counts);
each sequence gets a copy of the compiled matcher. On every step the backend asks `Grammars.masks` for the
allowed tokens of all its constrained sequences at once and masks their logits before choosing; after the
choice, `Matcher.consume` advances the sequence's matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from zinfer.shared.errors import InvalidRequest
from zinfer.shared.payloads import GenerateConfig

# JSON as json.dumps writes it: one space after ',' and ':', no other whitespace (a weak model cannot pad forever).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


class Constraint(NamedTuple):
    kind: str  # json_schema, regex, choice, grammar, lark
    text: str  # the schema (JSON text), regex, choice list (JSON text) or grammar
    field: str  # the request field a refusal names


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequest("guided_json is not valid JSON", field="guided_json") from None
    if not isinstance(schema, dict):
        raise InvalidRequest("the JSON schema must be an object", field="response_format")
    return json.dumps({**schema, "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}},
                      ensure_ascii=False)


def constraint_of(cfg: GenerateConfig) -> Constraint | None:
    """The constraint a request's fields ask for (at most one of them), or None."""
    asked = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(cfg, name) is not None]
    rf = cfg.response_format
    if rf is not None and rf.type != "text":
        asked.insert(0, "response_format")
    if len(asked) > 1:
        raise InvalidRequest(f"{asked[1]}: ask for one constraint at a time (also given: {asked[0]})",
                             field=asked[1])
    if not asked:
        return None
    name = asked[0]
    if name == "response_format":
        schema = rf.schema
        if schema is None and rf.json_schema is not None:
            schema = rf.json_schema.get("schema")
            if schema is None and rf.type == "json_schema":
                raise InvalidRequest("response_format: json_schema needs a schema ({\"name\": ..., \"schema\": {...}})",
                                     field="response_format")
        if rf.type == "json_object" and schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format: json_schema needs a schema (an object)", field="response_format")
        return Constraint("json_schema", _schema_text(schema), "response_format")
    if name == "guided_json":
        return Constraint("json_schema", _schema_text(cfg.guided_json), name)
    if name == "guided_regex":
        return Constraint("regex", cfg.guided_regex, name)
    if name == "guided_choice":
        return Constraint("choice", json.dumps(cfg.guided_choice, ensure_ascii=False), name)
    return Constraint("grammar", cfg.guided_grammar, name)


def tool_constraint(lark: str) -> Constraint:
    return Constraint("lark", lark, "tool_choice")


class Matcher:
    """One sequence's place in its grammar."""

    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def consume(self, token: int) -> bool:
        """Advance past the chosen token; True when the grammar is complete (the sequence should end)."""
        self.m.consume_token(token)
        return self.m.is_stopped() or self.m.is_error()


class Grammars:
    """A backend's vocabulary for llguidance and its compiled grammars."""

    def __init__(self, make_tokenizer, n_vocab: int, single_token=None):
        self._make_tokenizer = make_tokenizer
        self.n_vocab = n_vocab
        self._single_token = single_token  # text -> the one token id it is in this vocabulary, or None
        self._tokenizer = None
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self.compiles = 0
        # Compiles run on the preparing thread, and on the compute loop for a prompt with images that the engine
        # encodes there (llama.cpp): one at a time.
        self._lock = threading.RLock()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def lit(self, text: str) -> str:
        """A tag in a Lark grammar: the model's own token for it where llguidance holds that token special (a
        grammar cannot spell a special token out of text), else the quoted text."""
        token = self._single_token(text) if self._single_token else None
        if token is not None and self.tokenizer.is_special_token(token):
            return f"<[{token}]>"
        return json.dumps(text)

    def matcher(self, c: Constraint) -> Matcher:
        """A fresh matcher for the constraint; InvalidRequest naming its field if it cannot compile."""
        with self._lock:
            return Matcher(self._compiled(c).deep_copy())

    def _compiled(self, c: Constraint):
        import llguidance

        proto = self._cache.get(c)
        if proto is None:
            try:
                if c.kind == "json_schema":
                    grammar = llguidance.LLMatcher.grammar_from_json_schema(c.text)
                elif c.kind == "lark":
                    grammar = llguidance.LLMatcher.grammar_from_lark(c.text)
                else:
                    grammar = llguidance.grammar_from(c.kind, c.text)
                proto = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
                error = proto.get_error() if proto.is_error() else None
            except (ValueError, TypeError, RuntimeError) as exc:
                error = str(exc)
            if error is not None:
                raise InvalidRequest(f"{c.field}: the grammar library cannot compile it: {error[:500]}",
                                     field=c.field)
            self.compiles += 1
            self._cache[c] = proto
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(c)
        return proto

    def masks(self, matchers: list[Matcher]) -> np.ndarray:
        """(len(matchers), n_vocab) booleans: the tokens each may take next. One after another on this thread:
        llguidance's parallel executor keeps a thread pool whose spinning took the cores from llama.cpp's own
        threads (16 constrained streams ran at 0.17x free decoding on 2 cores; one by one, at 0.9x)."""
        words = np.full((len(matchers), (self.tokenizer.vocab_size + 31) // 32), -1, dtype=np.int32)
        row_bytes = words.shape[1] * 4
        for i, m in enumerate(matchers):
            m.m.unsafe_compute_mask_ptr(words[i].ctypes.data, row_bytes)
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)
        if bits.shape[1] >= self.n_vocab:
            return bits[:, :self.n_vocab]
        return np.pad(bits, ((0, 0), (0, self.n_vocab - bits.shape[1])))


def hf_tokenizer(tokenizer, n_vocab: int, eos: list[int]):
    """llguidance's tokenizer for a transformers (fast) tokenizer."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos or None)


def llama_tokenizer(lib, vocab, eos: list[int]):
    """llguidance's tokenizer for a llama.cpp vocabulary. Control tokens are special (the grammar cannot spell
    them out of text); user-defined ones such as `<tool_call>` are text, as llama.cpp's tokenizer treats them."""
    import ctypes

    import llguidance

    size = 16 * 1024
    buffer = ctypes.create_string_buffer(size + 1)
    tokens = []
    for token in range(lib.llama_vocab_n_tokens(vocab)):
        n = lib.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        piece = bytes(buffer[:max(n, 0)])
        if lib.llama_vocab_get_attr(vocab, token) & lib.LLAMA_TOKEN_ATTR_CONTROL:
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(lib.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return llguidance.LLTokenizer.from_llamacpp(tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize,
                                                eos_token=eos or lib.llama_vocab_eos(vocab))
