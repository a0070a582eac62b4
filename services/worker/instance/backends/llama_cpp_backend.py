"""llama.cpp engine (llama-cpp-python's low-level API) for `ggufv2` specs: several sequences in one decode.

One llama_context holds `n_parallel` sequences, each with its own range of the KV cache (context_length cells
each, kv_unified off). A step puts into one llama_batch the last token of every running sequence and the next
prompt tokens of sequences being prefilled (in chunks of n_batch), runs one llama_decode, and samples each
sequence with its own sampler chain, built the way llama-cpp-python's create_completion builds its own
(penalties, then greedy; or top-k, typical, top-p, min-p, temperature and a seeded dist), so that a lone greedy
run equals create_completion's. Each token is detokenized once (create_completion re-detokenizes the whole
completion after every token, quadratic in its length). The choices of one request (`n`) prefill once: the
others wait, then take a copy of the first one's cache (its images too) and sample from its logits.

Plain greedy sequences (temperature 0, no grammar, no penalties) skip the sampler chain: one numpy argmax over
every output row of the step (a view kept while llama.cpp's logits buffer stays put) picks their tokens, the
greedy sampler's choice (the first highest logit), where llama_sampler_sample copies the whole vocabulary into a
candidate array per sequence. With the batch's arrays fetched once, each token's bytes cached and end tokens
looked up in a set, a step on the tiny test model (a decode of ~45 us) costs 0.7 us less Python for one sequence
and 17 us less for 16 (41.5 against 43.6 ms for 16 x 128 tokens).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import random

import numpy as np

from zinfer.services.worker.instance.backends import slots
from zinfer.services.worker.instance.backends.base import (
    LLMBackend,
    LoadContext,
    Sampling,
    StepOut,
    log_softmax,
    token_logprob,
)
from zinfer.services.worker.instance.backends.llama_params import extra_buffers, model_defaults
from zinfer.services.worker.instance.grammar import Grammars, llama_tokenizer

N_BATCH = 512  # tokens per llama_decode, as llama-cpp-python's Llama uses by default
KV_BUDGET = 512 * 2**20  # what the default n_parallel lets the KV cache take
TURN_STEPS = 16  # decode steps one adapter set takes before the next set's sequences get theirs


def _order(group: tuple[str, float] | None) -> tuple[str, float]:
    """An adapter set's place in the turns (the base model's first)."""
    return ("", 0.0) if group is None else group


class _Detokenizer:
    """Each token's bytes once, through an incremental UTF-8 decoder (a multi-byte character can span tokens)."""

    __slots__ = ("piece", "decoder")

    def __init__(self, piece):
        self.piece = piece
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def push(self, token_ids: list[int]) -> str:
        piece = self.piece
        return self.decoder.decode(b"".join(piece(t) for t in token_ids) if len(token_ids) != 1 else
                                   piece(token_ids[0]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def plain_greedy(s: Sampling) -> bool:
    """Greedy with nothing that changes the logits first: the argmax is the token (no sampler chain needed)."""
    return (s.temperature == 0 and s.repetition_penalty in (None, 1.0)
            and not s.frequency_penalty and not s.presence_penalty)


class _Seq:
    __slots__ = ("id", "slot", "prompt", "fed", "pos", "last", "generated", "sampler", "max_tokens", "stop_ids",
                 "out_index", "out_row", "sampling", "lora", "images", "end", "leader")

    def __init__(self, seq_id: int, slot: int, prompt: list[int], sampler, sampling: Sampling):
        self.id, self.slot, self.prompt, self.sampler, self.sampling = seq_id, slot, prompt, sampler, sampling
        self.fed = 0  # prompt tokens decoded so far
        self.pos = 0  # tokens in this sequence's KV cache
        self.last = -1  # the token to decode next
        self.generated = 0
        self.max_tokens = sampling.max_tokens
        self.stop_ids = frozenset(sampling.stop_token_ids)
        self.out_index = -1  # its token's place in the current batch (-1: no logits this step)
        self.out_row = -1  # its row among the batch's outputs (llama_get_logits)
        self.lora: tuple[str, float] | None = None  # (adapter, scale) it decodes with; None: the base model
        self.images = list(sampling.media.images) if sampling.media is not None else []  # its images not yet fed
        self.end = self.images[0].start if self.images else len(prompt)  # where its next text tokens stop
        self.leader: _Seq | None = None  # the sequence whose prefill it waits to copy (another choice of its request)

    def follow(self, leader: _Seq) -> None:
        """Its prompt is in the cache as the leader's is now (the copy is made before the next decode), and its
        first token is drawn from the leader's logits of this step."""
        self.leader, self.images, self.end = None, [], len(self.prompt)
        self.fed, self.pos = leader.fed, leader.pos
        self.out_index, self.out_row = leader.out_index, leader.out_row
        if self.sampling.media is not None:
            self.sampling = self.sampling._replace(media=None)

    def feed_images(self, projector, lctx) -> None:
        """The images its prefill has reached, decoded into its cache (each at its position)."""
        while self.images and self.fed == self.images[0].start:
            image = self.images.pop(0)
            self.pos = projector.eval(lctx, image, self.pos, self.slot, N_BATCH)
            self.fed += image.n_tokens
            self.end = self.images[0].start if self.images else len(self.prompt)
            if not self.images:  # the chunks may go once every sequence of the request is past them
                self.sampling = self.sampling._replace(media=None)


class LlamaCppBackend(LLMBackend):
    engine = "llama.cpp"
    no_vision = ("was launched without a multimodal projector (list the model's mmproj file in its spec's "
                 "multimodal_projectors)")

    def __init__(self, path: str, device: str, context_length: int, n_threads: int | None = None,
                 n_parallel: int | None = None, amx: bool = False, projector: str | None = None):
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own chatter stays off the logs (errors still show), as Llama(verbose=False)
        self.lib = llama_cpp
        self.path = path
        self.device = device
        self.n_threads = n_threads
        self.context_length = context_length
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = -1 if device.startswith("cuda") else 0
        mparams.use_extra_bufts = self.use_extra_bufts = extra_buffers(llama_cpp.llama_print_system_info(), amx)
        self.model = internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.max_sequences = n_parallel or self.default_parallel(context_length)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = context_length * self.max_sequences
        cparams.n_batch = cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = self.max_sequences
        cparams.kv_unified = False  # each sequence its own context_length cells
        # As llama-cpp-python's Llama sets it: llama.cpp's own default (auto) turns flash attention on for the CPU,
        # whose different arithmetic moved logprobs by up to 4e-3 from create_completion's.
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cpus = os.cpu_count() or 1
        cparams.n_threads = n_threads or max(cpus // 2, 1)  # as Llama's defaults
        cparams.n_threads_batch = n_threads or cpus
        self.ctx = internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        b = self.batch  # its arrays, fetched once (each attribute read of a ctypes struct makes a new pointer)
        self._b_token, self._b_pos, self._b_nseq, self._b_seq, self._b_logits = (
            b.token, b.pos, b.n_seq_id, b.seq_id, b.logits)
        self._pieces: dict[int, bytes] = {}
        # llama_get_logits answering a plain address, and a numpy view of the step's output rows kept while the
        # buffer stays where it is (np.ctypeslib.as_array per step costs more than the argmax on a small model).
        self._get_logits = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
            ("llama_get_logits", llama_cpp.llama_cpp._lib))
        self._view_key: tuple[int, int] = (0, 0)
        self._view: np.ndarray | None = None
        meta = self.model.metadata()
        self.chat_template = meta.get("tokenizer.chat_template")
        self.bos_token = self._token_text(self.model.token_bos())
        self.eos_token = self._token_text(self.model.token_eos())
        self._free_slots = set(range(self.max_sequences))
        self._holes = False  # a sequence left: some adapter set's slots may no longer be one run
        self.adapters = {}
        self._lora_ptrs: dict[str, int] = {}
        self._applied: tuple[str, float] | None = None  # the adapter set on the context now
        self._turn = 0  # steps the applied adapter set has had in its current turn
        self._seqs: dict[int, _Seq] = {}
        self._embedder = None
        # End-of-generation token ids, as a set (is a token one?) and an array (min_tokens holds them off):
        # one llama_vocab_is_eog per vocabulary entry, once (~0.5 us each: 75 ms for 150k tokens).
        is_eog = llama_cpp.llama_vocab_is_eog
        self._eog = np.array([t for t in range(self.n_vocab) if is_eog(self.vocab, t)], dtype=np.int64)
        self._eog_set = frozenset(self._eog.tolist())
        self.grammars = Grammars(lambda: llama_tokenizer(llama_cpp, self.vocab, self._eog.tolist()), self.n_vocab,
                                 self._single_token)
        self.projector = None
        if projector is not None:
            from zinfer.services.worker.instance.backends.llama_vision import Projector

            try:
                self.projector = Projector(projector, self.model.model, device, cparams.n_threads_batch)
            except BaseException:
                self.close()  # the model and context too: the launch failed
                raise
            self.vision, self.media_marker = True, self.projector.marker

    def encode_images(self, text: str, images: list):
        """The prompt's ids (each image's places held by llama_vision.IMAGE) and its image chunks (Sampling.media),
        for a prompt with the media marker where each image goes."""
        return self.projector.tokenize(text, images)

    def _single_token(self, text: str) -> int | None:
        ids = self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def default_parallel(self, context_length: int) -> int:
        """Sequences decoded together by default: as many as KV_BUDGET of f16 KV cache holds (at most 16)."""
        lib, model = self.lib, self.model.model
        n_layer, n_embd = lib.llama_model_n_layer(model), lib.llama_model_n_embd(model)
        n_head, n_head_kv = lib.llama_model_n_head(model), max(1, lib.llama_model_n_head_kv(model))
        kv_per_token = 2 * n_layer * (n_embd * n_head_kv // max(1, n_head)) * 2
        return max(1, min(16, KV_BUDGET // max(1, kv_per_token * context_length)))

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.model.detokenize([token_id], special=True).decode("utf-8", errors="ignore")

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt as create_completion tokenizes it: BOS/EOS as the vocabulary asks, special tokens parsed."""
        model = self.model
        bos = model.token_cls() if model.token_cls() != -1 else model.token_bos()
        head = [bos] if model.add_bos_token() and bos != -1 else []
        sep = model.token_sep()
        tail = [sep if sep != -1 else model.token_eos()] if (model.add_eos_token() or sep != -1) else []
        return head + model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) + tail

    def detokenizer(self) -> _Detokenizer:
        return _Detokenizer(self._piece)

    def _piece(self, token: int) -> bytes:
        """A token's bytes as detokenize([token]) gives them (special tokens empty), cached per token id."""
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
                if n >= 0:
                    break
                size = -n  # the piece needs this many bytes
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def token_text(self, token_id: int) -> str:
        return self.model.detokenize([token_id], special=False).decode("utf-8", errors="ignore")

    # ------------------------------------------------------------------ sequences

    def _sampler(self, s: Sampling):
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lib.llama_sampler_chain_add
        add(chain, lib.llama_sampler_init_penalties(
            self.n_vocab, 64, 1.0 if s.repetition_penalty is None else s.repetition_penalty, s.frequency_penalty,
            s.presence_penalty))
        if s.temperature == 0:
            add(chain, lib.llama_sampler_init_greedy())
        else:
            add(chain, lib.llama_sampler_init_top_k(40 if s.top_k is None else s.top_k))
            add(chain, lib.llama_sampler_init_typical(1.0, 1))
            add(chain, lib.llama_sampler_init_top_p(0.95 if s.top_p is None else s.top_p, 1))
            add(chain, lib.llama_sampler_init_min_p(0.05, 1))
            add(chain, lib.llama_sampler_init_temp(s.temperature))
            add(chain, lib.llama_sampler_init_dist(s.seed if s.seed is not None else random.getrandbits(32)))
        return chain

    def add(self, seq_id: int, prompt_ids: list[int], sampling: Sampling, same_prompt_as: int | None = None) -> None:
        if not self._free_slots:
            raise RuntimeError("no free sequence slot")
        sampler = None if plain_greedy(sampling) else self._sampler(sampling)
        lora = None
        if sampling.adapter is not None:
            scale = sampling.adapter_scale
            lora = (sampling.adapter, self.adapters[sampling.adapter].lora_scale if scale is None else scale)
        self._close_holes()
        seq = _Seq(seq_id, self._slot_for(lora), list(prompt_ids), sampler, sampling)
        seq.lora = lora
        leader = self._seqs.get(same_prompt_as) if same_prompt_as is not None else None
        # Not with logprobs: they are read from the logits row before min_tokens or a grammar edits it in place,
        # and a shared row would show the leader's edits.
        if leader is not None and leader.fed == 0 and leader.lora == lora and sampling.logprobs is None:
            seq.leader = leader
        self._free_slots.discard(seq.slot)
        self._seqs[seq_id] = seq
        self._sort()

    def _sort(self) -> None:
        """The sequences in slot order, as the batch goes to llama_decode: with the slots descending, llama.cpp split
        it into one micro-batch per sequence (16 streams decoded at 0.15x their speed in ascending order)."""
        self._seqs = dict(sorted(self._seqs.items(), key=lambda item: item[1].slot))

    def _slot_for(self, lora: tuple[str, float] | None) -> int:
        """A free slot next to the adapter set's own (see slots.py), the sequences it moves moved first."""
        slot, moves = slots.place({seq.slot: seq.lora for seq in self._seqs.values()}, lora, self.max_sequences)
        self._move(moves)
        return slot

    def _close_holes(self) -> None:
        if self._holes:  # sequences ended since: their adapter sets' runs closed up again
            self._holes = False
            self._move(slots.compact({seq.slot: seq.lora for seq in self._seqs.values()}))

    def _move(self, moves: slots.Moves) -> None:
        """Sequences to free slots, each one's cache with it (llama.cpp copies the stream at the next decode)."""
        if not moves:
            return
        at = {seq.slot: seq for seq in self._seqs.values()}
        for src, dst in moves:
            seq = at.pop(src)
            if seq.pos:
                self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
                self.lib.llama_memory_seq_rm(self.memory, src, -1, -1)
            self._free_slots.discard(dst)
            self._free_slots.add(src)
            seq.slot = dst
            at[dst] = seq
        self._sort()

    def active(self) -> int:
        return len(self._seqs)

    def remove(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            for waiting in self._seqs.values():  # the leader went before its prefill was done: they prefill alone
                if waiting.leader is seq:
                    waiting.leader = None
            self.lib.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            if seq.sampler is not None:
                self.lib.llama_sampler_free(seq.sampler)
            self._free_slots.add(seq.slot)
            self._holes = True

    def step(self) -> list[StepOut]:
        self._close_holes()
        group = self._next_group()
        if self.projector is not None:
            for seq in list(self._seqs.values()):
                if seq.images and seq.lora == group and seq.leader is None:
                    seq.feed_images(self.projector, self.ctx.ctx)
        n, rows, copies = self._fill_batch(group)
        if n == 0:
            return []
        self.batch.n_tokens = n
        rc = self.lib.llama_decode(self.ctx.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc})")
        for src, dst in copies:  # the leaders' caches now hold their prompts: the followers' copies
            self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        logits = self._logits(rows) if rows else None
        constrained = [seq for seq in self._seqs.values() if seq.out_index >= 0 and seq.sampling.matcher is not None]
        masks = dict(zip((seq.id for seq in constrained), self.grammars.masks([seq.sampling.matcher for seq in
                                                                                constrained]), strict=True)) \
            if constrained else {}
        best: list[int] = []  # the argmax of every row, computed once for the plain greedy sequences

        def argmax(row: int) -> int:
            if not best:
                best.extend(logits.argmax(axis=1).tolist())
            return best[row]

        outs: list[StepOut] = []
        for seq in list(self._seqs.values()):
            if seq.out_index < 0:
                continue
            if seq.last >= 0:
                seq.pos += 1  # the token just decoded is in the cache now
            token, lp = self._pick(seq, logits, masks.get(seq.id), argmax)
            seq.out_index = -1
            outs.append(self._emit(seq, token, lp))
        return outs

    def _next_group(self) -> tuple[str, float] | None:
        """The adapter set this step decodes, set on the context. llama.cpp applies adapters per context, so
        sequences with different ones cannot share a decode: each set's sequences take TURN_STEPS steps in turn
        (a change of set makes llama.cpp build its graph again: once per step, that ran 16 mixed streams at
        0.17x the base's speed on the small model)."""
        if not self._lora_ptrs and self._applied is None:
            return None
        order = sorted({_order(seq.lora) for seq in self._seqs.values()})
        if not order:
            return self._applied
        if _order(self._applied) in order and self._turn < TURN_STEPS:
            self._turn += 1
            return self._applied
        now = _order(self._applied)
        key = next((k for k in order if k > now), order[0])  # the next set after this one, round the circle
        group = None if key == _order(None) else key
        self._turn = 1
        if group != self._applied:
            lib = self.lib
            if group is None:
                rc = lib.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
            else:
                rc = lib.llama_set_adapters_lora(self.ctx.ctx, (lib.llama_adapter_lora_p_ctypes * 1)(
                    self._lora_ptrs[group[0]]), 1, (ctypes.c_float * 1)(group[1]))
            if rc != 0:
                raise RuntimeError(f"llama_set_adapters_lora failed (code {rc})")
            self._applied = group
        return group

    def add_adapter(self, lora, path: str) -> None:
        ptr = self.lib.llama_adapter_lora_init(self.model.model, path.encode("utf-8"))
        if not ptr:
            from zinfer.shared.errors import InvalidRequest

            raise InvalidRequest(f"LoRA adapter {lora.lora_name!r}: llama.cpp could not load {path}",
                                 field="peft_model_config")
        self._lora_ptrs[lora.lora_name] = ptr
        self.adapters[lora.lora_name] = lora

    def drop_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self._applied is not None and self._applied[0] == name:
            self.lib.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
            self._applied = None
        self.lib.llama_adapter_lora_free(self._lora_ptrs.pop(name))

    def _fill_batch(self, group: tuple[str, float] | None) -> tuple[int, int, list[tuple[int, int]]]:
        """The group's running sequences first (one token each), then its prompt chunks while the batch has room
        (a follower puts none: it takes its leader's cache once the leader's prompt is in): (tokens in the batch,
        rows of logits it gives, the (leader, follower) slots whose caches to copy after the decode)."""
        n = rows = 0
        copies: list[tuple[int, int]] = []
        seqs = [seq for seq in self._seqs.values() if seq.lora == group] if self._lora_ptrs else \
            list(self._seqs.values())
        for seq in seqs:
            if seq.fed == len(seq.prompt):
                n = self._put(n, seq.last, seq.pos, seq.slot, True)
                seq.out_index, seq.out_row, rows = n - 1, rows, rows + 1
        for seq in seqs:
            if seq.fed < seq.end and n < N_BATCH and seq.leader is None:  # its prompt up to its next image
                for token in seq.prompt[seq.fed:min(seq.end, seq.fed + N_BATCH - n)]:
                    seq.fed += 1
                    n = self._put(n, token, seq.pos, seq.slot, seq.fed == len(seq.prompt))
                    seq.pos += 1
                if seq.fed == len(seq.prompt):
                    seq.out_index, seq.out_row, rows = n - 1, rows, rows + 1
                    for follower in seqs:
                        if follower.leader is seq:
                            follower.follow(seq)
                            copies.append((seq.slot, follower.slot))
        return n, rows, copies

    def _pick(self, seq, logits, mask, argmax) -> tuple[int, np.ndarray | None]:
        """A sequence's next token (and the log-probabilities it was drawn from, when asked for)."""
        s, lp, token = seq.sampling, None, None
        if s.logprobs is not None or seq.generated < s.min_tokens or mask is not None:
            row = logits[seq.out_row]
            if s.logprobs is not None:  # of the model's own distribution, before anything is held off
                lp = log_softmax(row)
            if seq.generated < s.min_tokens:
                row[self._eog] = -np.inf  # in place: the sampler reads the context's logits
            if mask is not None:
                row[~mask] = -np.inf
            token = int(row.argmax()) if seq.sampler is None else None
        elif seq.sampler is None:
            token = argmax(seq.out_row)
        if token is None:
            token = self.lib.llama_sampler_sample(seq.sampler, self.ctx.ctx, seq.out_index)
        return token, lp

    def _emit(self, seq, token: int, lp) -> StepOut:
        """The token's outcome for its sequence: a stop (the token is not shown), or one more token, maybe its last."""
        s = seq.sampling
        if token in seq.stop_ids or (not s.ignore_eos and token in self._eog_set):
            self.remove(seq.id)
            return StepOut(seq.id, [], "stop")
        seq.generated += 1
        seq.last = token
        finish = "length" if seq.generated >= seq.max_tokens else None
        if s.matcher is not None and s.matcher.consume(token):  # the grammar is complete: nothing may follow
            finish = "stop"
        if finish:
            self.remove(seq.id)
        return StepOut(seq.id, [token], finish, token_logprob(lp, token, s.logprobs) if lp is not None else None)

    def _logits(self, rows: int) -> np.ndarray:
        """The last decode's output rows (in batch order, as llama.h lays them out: [rows, n_vocab])."""
        key = (self._get_logits(self.ctx.ctx), rows)
        if key != self._view_key:
            buffer = (ctypes.c_float * (rows * self.n_vocab)).from_address(key[0])
            self._view = np.frombuffer(buffer, dtype=np.float32).reshape(rows, self.n_vocab)
            self._view_key = key
        return self._view

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> int:
        self._b_token[i] = token
        self._b_pos[i] = pos
        self._b_nseq[i] = 1
        self._b_seq[i][0] = slot
        self._b_logits[i] = logits
        return i + 1

    # ------------------------------------------------------------------ embeddings

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        if self._embedder is None:  # llama.cpp embeds only from a context made for it
            from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

            # Mean pooling, as the transformers backend does (a file may declare no pooling of its own).
            with model_defaults(self.use_extra_bufts):
                self._embedder = Llama(model_path=self.path, n_ctx=self.context_length, embedding=True,
                                       pooling_type=LLAMA_POOLING_TYPE_MEAN,
                                       n_gpu_layers=-1 if self.device.startswith("cuda") else 0,
                                       n_threads=self.n_threads, verbose=False)
        result = self._embedder.create_embedding(texts)
        vectors = np.asarray([d["embedding"] for d in result["data"]], dtype=np.float32)
        return vectors, int(result["usage"]["prompt_tokens"])

    def close(self) -> None:
        for seq_id in list(self._seqs):
            self.remove(seq_id)
        for name in list(self.adapters):
            self.drop_adapter(name)
        self.lib.llama_batch_free(self.batch)
        if self.projector is not None:  # before the model it was loaded against
            self.projector.close()
        self.ctx.close()
        self.model.close()
        if self._embedder is not None:
            self._embedder.close()


def load(ctx: LoadContext):
    """The llama.cpp engine of an instance (shared/engines.py): the backend, and the generation engine on it.
    llama.cpp runs no model code, so trust_remote_code changes nothing here."""
    from zinfer.services.worker.instance.llm_batcher import LLMBatcher

    spec, opts = ctx.launch, ctx.launch.options
    batching = opts.continuous_batching is not False
    backend = LlamaCppBackend(ctx.path, ctx.device, opts.n_ctx or spec.llm.context_length,
                              n_threads=opts.n_threads or ctx.threads or None,
                              n_parallel=opts.n_parallel if batching else 1, amx=ctx.llama_cpp_amx,
                              projector=ctx.projector)
    return backend, LLMBatcher(ctx.uid, spec.llm, backend, ctx.wake, ctx.queue_limit, ctx.template_timeout_s)
