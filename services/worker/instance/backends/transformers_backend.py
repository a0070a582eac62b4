"""transformers engine for `pytorch` specs: AutoTokenizer + AutoModelForCausalLM, decoded step by step here.

The worker's compute loop steps this backend; it holds up to `max_sequences` sequences in one batch with one
KV cache (transformers' DynamicCache), so concurrent requests are decoded together:
- a new sequence is prefilled alone (one forward over its prompt, exactly as generate() does for one prompt),
  its first token sampled, and its cache merged into the batch's (left-padded to a common length; an
  attention mask hides the padding, each row keeps its own positions);
- each step decodes one token for every sequence in the batch with one forward;
- a sequence that ends is sliced out, and padding every remaining row shares is trimmed.
Greedy decoding is argmax, as generate() does; sampled decoding applies repetition penalty, temperature,
top-k and top-p (generate()'s order) with a per-sequence seeded generator.
"""

from __future__ import annotations

import inspect
import io
import json
import random
from pathlib import Path

import numpy as np

from zinfer.services.worker.instance.backends.base import LLMBackend, LoadContext, Sampling, StepOut, token_logprob
from zinfer.services.worker.instance.grammar import Grammars, hf_tokenizer
from zinfer.shared.errors import InvalidRequest


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.emitted = ""

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def flush(self) -> str:
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        rest = full[len(self.emitted):] if full.startswith(self.emitted) else ""
        self.emitted += rest
        return rest


# Presence and frequency penalties look at the last 64 generated tokens, as llama.cpp's penalties sampler does
# with the window our llama.cpp backend gives it (the prompt is not counted there either).
PENALTY_LAST_N = 64


def penalize(logits, recent: list[int], presence: float, frequency: float):
    """OpenAI's presence and frequency penalties, applied as llama.cpp applies them: each token seen `c` times
    among the recent generated tokens loses `c * frequency + presence` from its logit."""
    import torch

    ids, counts = torch.unique(torch.tensor(recent, device=logits.device), return_counts=True)
    logits = logits.float().clone()
    logits[:, ids] -= counts.to(logits.dtype) * frequency + presence
    return logits


class _Seq:
    __slots__ = ("id", "prompt", "sampling", "stop_ids", "generated", "last", "length", "generator", "history",
                 "processors", "eos", "recent", "leader")

    def __init__(self, seq_id: int, prompt: list[int], sampling: Sampling, stop_ids: frozenset[int]):
        self.id, self.prompt, self.sampling, self.stop_ids = seq_id, prompt, sampling, stop_ids
        self.generated = 0
        self.last = -1
        self.length = 0  # real tokens in this sequence's cache row (its next position)
        self.generator = None
        self.history = None  # prompt + generated ids, for the repetition penalty
        self.processors = None
        self.recent = None  # generated ids, for presence and frequency penalties (the last PENALTY_LAST_N)
        self.leader: int | None = None  # the first choice of its request, whose prefill it takes (same_prompt_as)


class TransformersBackend(LLMBackend):
    engine = "transformers"
    media_anywhere = True  # the processor's decoding and resizing hold nothing the compute loop uses

    def __init__(self, path: str, device: str, quantization: str, context_length: int,
                 trust_remote_code: bool = False, max_sequences: int = 64):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        kwargs: dict = {"trust_remote_code": trust_remote_code}
        if quantization in ("4-bit", "8-bit"):
            if not device.startswith("cuda"):
                raise InvalidRequest(f"quantization {quantization!r} needs a GPU (bitsandbytes); "
                                     "launch with quantization 'none' on the CPU", field="quantization")
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except ImportError:
                raise InvalidRequest(f"quantization {quantization!r} needs the bitsandbytes package",
                                     field="quantization") from None
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "4-bit", load_in_8bit=quantization == "8-bit")
            kwargs["device_map"] = device
        dtype = torch.float32
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model_class = AutoModelForCausalLM
        self.processor = None
        if _has_vision(path):  # an image-text-to-text model (LLaVA-style, Qwen2-VL-style): its processor too
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.tokenizer = self.processor.tokenizer
            self.vision, model_class = True, AutoModelForImageTextToText
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The first call may clear padding and truncation that the files set: a write to the Rust tokenizer, which
        # must not meet a decode on the compute loop (prompts are tokenized on the preparing thread).
        self.tokenize("")
        self.model = model_class.from_pretrained(path, dtype=dtype, **kwargs)
        if "device_map" not in kwargs:
            self.model.to(device)
        self.model.eval()
        self.context_length = context_length
        self.chat_template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template",
                                                                                     None)
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        self.template_vars = dict(self.tokenizer.special_tokens_map)
        # Every end: generation_config.json's eos_token_id (one id or a list), and the tokenizer's EOS.
        eos = self.model.generation_config.eos_token_id
        ends = list(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ends.append(self.tokenizer.eos_token_id)
        self.eos_ids = tuple(dict.fromkeys(ends))
        n_vocab = self.model.get_output_embeddings().weight.shape[0]
        added = self.tokenizer.get_added_vocab()
        self.grammars = Grammars(lambda: hf_tokenizer(self.tokenizer, n_vocab, list(self.eos_ids)), n_vocab,
                                 added.get)
        self.max_sequences = max(1, max_sequences)
        # generate() computes the prefill's logits for the last position only; do the same (same numbers).
        self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # transformers 5.x renamed forward's past_key_values to cache (the old name warns, and goes in 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._new: list[_Seq] = []  # added, not yet prefilled
        self._rows: list[_Seq] = []  # the batch, in cache row order
        self._cache = None
        self._mask = None  # (rows, cache length): 1 for real tokens, 0 for left padding
        self.adapters = {}
        self._mix = None  # with adapters loaded: each forward's rows to their adapters, in every LoRA layer

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def encode_images(self, text: str, images: list) -> tuple[list[int], dict]:
        """The processor's ids (each image token expanded to the image's tokens) and its pixel tensors."""
        from PIL import Image

        pictures = []
        for image in images:
            try:
                with Image.open(io.BytesIO(image.data)) as im:
                    pictures.append(im.convert("RGB"))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise InvalidRequest(f"{image.where}: not an image that can be read ({exc})", field=image.where) \
                    from None
        bos = self.tokenizer.bos_token
        try:  # as the processor's apply_chat_template: no second BOS when the template wrote one
            enc = self.processor(text=text, images=pictures, return_tensors="pt",
                                 add_special_tokens=not (bos and text.startswith(bos)))
        except ValueError as exc:  # the template's image tokens and the images do not pair up
            raise InvalidRequest(f"{images[0].where}: the chat template did not place the images: {exc}",
                                 field=images[0].where) from None
        ids = enc.pop("input_ids")[0].tolist()
        enc.pop("attention_mask", None)
        dtype = self.model.dtype
        return ids, {k: v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in enc.items()}

    def detokenizer(self) -> IncrementalDecoder:
        return IncrementalDecoder(self.tokenizer)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def active(self) -> int:
        return len(self._new) + len(self._rows)

    def add(self, seq_id: int, prompt_ids: list[int], sampling: Sampling, same_prompt_as: int | None = None) -> None:
        ends = sampling.stop_token_ids if sampling.ignore_eos else self.eos_ids + sampling.stop_token_ids
        seq = _Seq(seq_id, list(prompt_ids), sampling, frozenset(ends))
        seq.eos = list(self.eos_ids)
        if sampling.presence_penalty or sampling.frequency_penalty:
            seq.recent = []
        if sampling.temperature:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            seq.generator = self.torch.Generator(device=self.device).manual_seed(seed)
            seq.processors = self._processors(sampling)
        if sampling.repetition_penalty is not None:
            seq.history = list(prompt_ids)
            if seq.processors is None:
                seq.processors = self._processors(sampling)
        seq.leader = same_prompt_as
        self._new.append(seq)

    def remove(self, seq_id: int) -> None:
        self._new = [s for s in self._new if s.id != seq_id]
        keep = [i for i, s in enumerate(self._rows) if s.id != seq_id]
        if len(keep) != len(self._rows):
            self._keep_rows(keep)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[StepOut]:
        outs: list[StepOut] = []
        with self.torch.inference_mode():
            if self._rows:
                outs += self._decode()
            prefilled: dict[int, tuple] = {}  # this step's prefills, for the other choices of their requests
            while self._new:
                outs += self._prefill(self._new.pop(0), prefilled)
        return outs

    def _prefill(self, seq: _Seq, prefilled: dict[int, tuple]) -> list[StepOut]:
        """Its prompt through the model, or its leader's prefill of this step (the first choice of its request:
        the same prompt and images); its first token drawn from the last position's logits."""
        torch = self.torch
        media = seq.sampling.media or {}  # the images' pixels, for this prefill only
        if media:
            seq.sampling = seq.sampling._replace(media=None)
        if seq.leader in prefilled:
            logits, cache, rows = prefilled[seq.leader]
        else:
            ids = torch.tensor([seq.prompt], device=self.device)
            kwargs = {"logits_to_keep": 1} if self._keep_last else {}
            out = self._forward([seq], input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs,
                                **media)
            logits, cache = out.logits[:, -1, :], out.past_key_values
            # its cache's tensors as the prefill left them (merging into the batch replaces the layers' tensors)
            rows = [(layer.keys, layer.values) for layer in self._layers(cache)]
            prefilled[seq.id] = (logits, cache, rows)
        seq.length = len(seq.prompt)
        mask = self.grammars.masks([seq.sampling.matcher])[0] if seq.sampling.matcher is not None else None
        result = self._advance(seq, logits, mask)
        if result.finish is None:
            self._merge(seq, cache, rows)
        return [result]

    def _decode(self) -> list[StepOut]:
        torch = self.torch
        rows = self._rows
        input_ids = torch.tensor([[s.last] for s in rows], device=self.device)
        positions = torch.tensor([[s.length] for s in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self._forward(rows, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self._cache_kw: self._cache})
        self._cache, self._mask = out.past_key_values, mask
        logits = out.logits[:, -1, :]
        results, keep = [], []
        constrained = [i for i, seq in enumerate(rows) if seq.sampling.matcher is not None]
        masks = dict(zip(constrained, self.grammars.masks([rows[i].sampling.matcher for i in constrained]),
                         strict=True)) if constrained else {}
        for i, seq in enumerate(rows):
            seq.length += 1
            result = self._advance(seq, logits[i:i + 1], masks.get(i))
            results.append(result)
            if result.finish is None:
                keep.append(i)
        if len(keep) != len(rows):
            self._keep_rows(keep)
        return results

    def _forward(self, seqs: list[_Seq], **kwargs):
        """One forward of these rows; with adapters loaded, each row through its own adapter or none, in the same
        forward (lora_mix.MixedLora: two matmuls a LoRA layer whatever the mix; rows that share one adapter, as
        in each prefill, take PEFT's plain path for it, as its own generate runs it)."""
        if not self.adapters:
            return self.model(**kwargs)
        self._mix.set_rows([s.sampling.adapter for s in seqs])
        return self.model.get_base_model()(**kwargs)

    def _mix_lora_layers(self) -> None:
        from .lora_mix import MixedLora

        if self._mix is not None:
            self._mix.close()
        self._mix = MixedLora(self.torch, self.model) if self.adapters else None

    def unsupported(self, sampling: Sampling) -> str | None:
        return "lora_scale" if sampling.adapter_scale is not None else None

    def add_adapter(self, lora, path: str) -> None:
        from peft import PeftModel

        name = lora.lora_name
        if not self.adapters:
            base = self.model
            try:
                self.model = PeftModel.from_pretrained(base, path, adapter_name=name, is_trainable=False)
            except Exception:
                self.model = _without_lora(base)
                raise
        else:
            try:
                self.model.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception:
                if name in self.model.peft_config:
                    self.model.delete_adapter(name)
                raise
        self.model.eval()
        self.adapters[name] = lora
        self._mix_lora_layers()

    def drop_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.adapters:
            self.model.delete_adapter(name)
        else:  # the last one: back to the plain model (no LoRA layers, no per-step hooks)
            self.model = self.model.unload()
        self._mix_lora_layers()

    def _advance(self, seq: _Seq, logits, mask=None) -> StepOut:
        """Pick the next token of one sequence from its logits row (1, vocab); `mask`: the tokens its grammar
        allows (booleans), or None."""
        torch = self.torch
        s = seq.sampling
        logprobs = torch.log_softmax(logits.float(), dim=-1)[0].cpu().numpy() if s.logprobs is not None else None
        if mask is not None:
            logits = logits.masked_fill(~torch.from_numpy(mask).to(logits.device), -float("inf"))
        if seq.generated < s.min_tokens and seq.eos:  # as generate(min_new_tokens=...): no end token yet
            logits = logits.clone()
            logits[:, seq.eos] = -float("inf")
        if seq.recent:
            logits = penalize(logits, seq.recent, s.presence_penalty, s.frequency_penalty)
        if seq.processors is not None:
            history = torch.tensor([seq.history if seq.history is not None else [seq.last]], device=self.device)
            logits = seq.processors(history, logits.float())
        if s.temperature:
            probs = torch.softmax(logits.float(), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator)[0, 0])
        else:
            token = int(torch.argmax(logits, dim=-1)[0])
        seq.generated += 1
        seq.last = token
        if seq.history is not None:
            seq.history.append(token)
        if seq.recent is not None:
            seq.recent.append(token)
            if len(seq.recent) > PENALTY_LAST_N:
                del seq.recent[0]
        lp = token_logprob(logprobs, token, s.logprobs) if logprobs is not None else None
        if token in seq.stop_ids:  # as generate(): the end token counts, and decodes to nothing (special)
            return StepOut(seq.id, [token], "stop", lp)
        if s.matcher is not None and s.matcher.consume(token):  # the grammar is complete: nothing may follow
            return StepOut(seq.id, [token], "stop", lp)
        return StepOut(seq.id, [token], "length" if seq.generated >= s.max_tokens else None, lp)

    def _processors(self, s: Sampling):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if s.repetition_penalty is not None:
            out.append(RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty))
        if s.temperature:
            out.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k is not None:
                out.append(TopKLogitsWarper(top_k=s.top_k))
            if s.top_p is not None:
                out.append(TopPLogitsWarper(top_p=s.top_p))
        return out

    # ------------------------------------------------------------------ the batch's cache

    def _layers(self, cache) -> list:
        layers = getattr(cache, "layers", None)
        if layers is None or any(not hasattr(layer, "keys") for layer in layers):
            raise RuntimeError(f"unsupported cache type {type(cache).__name__}")
        return layers

    def _merge(self, seq: _Seq, cache, rows: list[tuple]) -> None:
        """A prefilled sequence into the batch: its cache (`rows`: each layer's keys and values) as one more row."""
        torch = self.torch
        if not self._rows:  # the step's first merge: no other has replaced the prefill's tensors yet
            self._rows, self._cache = [seq], cache
            self._mask = torch.ones((1, seq.length), dtype=torch.long, device=self.device)
            return
        old_len, new_len = self._mask.shape[1], seq.length
        width = max(old_len, new_len)
        for mine, (keys, values) in zip(self._layers(self._cache), rows, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(values, width)], dim=0)
        new_mask = torch.ones((1, new_len), dtype=torch.long, device=self.device)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(new_mask, width)], dim=0)
        self._rows.append(seq)

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        torch = self.torch
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0  # padding all remaining rows share goes
        for layer in self._layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]

    # ------------------------------------------------------------------ embeddings, close

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        torch = self.torch
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        model = self.model
        if self.adapters:  # embeddings come from the base model: no LoRA layer adds anything
            self._mix.set_rows([None] * len(texts))
            model = self.model.get_base_model()
        with torch.inference_mode():
            out = model(**enc, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled.float().cpu().numpy(), int(enc["attention_mask"].sum())

    def close(self) -> None:
        self._new, self._rows, self._cache, self._mask = [], [], None, None
        del self.model
        if self.device.startswith("cuda"):
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()


def _has_vision(path: str) -> bool:
    """Whether the model folder's config.json describes a vision-language model (a vision_config in it)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def _without_lora(model):
    """The model with any LoRA layers a failed PEFT load left in it replaced by the layers they wrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def _left_pad(t, width: int):
    """(batch, heads, length, dim) -> (batch, heads, width, dim), zeros on the left."""
    import torch

    missing = width - t.shape[2]
    if missing <= 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], t.shape[1], missing, t.shape[3])), t], dim=2)


def _left_pad_mask(mask, width: int):
    import torch

    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def load(ctx: LoadContext):
    """The transformers engine of an instance (shared/engines.py): the backend, and the generation engine on it."""
    from zinfer.services.worker.instance.llm_batcher import LLMBatcher

    spec = ctx.launch
    batching = spec.options.continuous_batching is not False
    backend = TransformersBackend(ctx.path, ctx.device, spec.quantization, spec.llm.context_length,
                                  trust_remote_code=ctx.trust_remote_code,
                                  max_sequences=ctx.option("max_sequences") if batching else 1)
    return backend, LLMBatcher(ctx.uid, spec.llm, backend, ctx.wake, ctx.queue_limit, ctx.template_timeout_s)
