"""Work that transformers' generate does more than once on an encoder-decoder model (Whisper in the speech engine),
done once: the encoder on the same input features, and what the beams of one input share.

Whisper's generate encodes the same features up to three times for one window (its language detection, then its
generate call's own encoding, once per inner generate): `remember_last_encoding` gives the encoder's output again
when the same features (equal, value for value) come back with the same arguments.

For beam search transformers also copies what the beams of one input share: the cross-attention keys and values,
computed once from that input's encoder states and identical for each of its beams.

transformers expands the encoder states to one row per beam, so the cross-attention cache holds a copy per beam;
at every step its beam search reorders that cache (copying every row), and attention reads each beam's own copy.
On a CPU both are memory traffic: for 8 windows of 30 seconds with the pipeline's 5 beams, 40 copies of
1500 frames x width per layer, every step. Here:
- `reorder_self_attention` (generate's `_reorder_cache` hook) reorders the self-attention cache only: a beam never
  moves to another input, so the cross-attention rows it would take are the ones it has;
- `share_cross_attention` makes each cross-attention read one copy per input for all of its beams: the same SDPA
  kernel, called per input with that input's first row broadcast (a view) to its beams; and it projects each
  input's encoder states to keys and values once, not once per beam. Each beam's arithmetic is
  the stock kernel's on the same values, so the outputs are the same bit for bit (tests/test_audio.py checks
  whole beam searches against transformers' own).
"""

from __future__ import annotations

import contextvars

import torch
from transformers import AttentionInterface
from transformers.cache_utils import EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "zinfer_beam_sdpa"
_beams: contextvars.ContextVar[int] = contextvars.ContextVar("zinfer_beams", default=1)


def reorder_self_attention(cache, beam_idx):
    """Beam search's reorder of an encoder-decoder model's cache, self-attention only (see above)."""
    if isinstance(cache, EncoderDecoderCache):
        cache.self_attention_cache.reorder_cache(beam_idx)
    else:
        cache.reorder_cache(beam_idx)
    return cache


def _beam_group(rows: int) -> int:
    """The beams of one input, when a beam search runs and `rows` holds its inputs' beams side by side; else 0."""
    beams = _beams.get()
    return beams if beams > 1 and rows % beams == 0 else 0


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, with a cross-attention of a beam search run per input over its first beam's keys and values."""
    rows = query.shape[0]
    beams = _beam_group(rows)
    if beams and getattr(module, "zinfer_cross", False) and attention_mask is None and key.shape[0] == rows:
        outs = []
        for start in range(0, rows, beams):
            shared = (beams, *key.shape[1:])
            outs.append(sdpa_attention_forward(module, query[start:start + beams],
                                               key[start:start + 1].expand(shared),
                                               value[start:start + 1].expand(shared), None, **kwargs)[0])
        return torch.cat(outs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _PerInput:
    """A cross-attention key or value projection that, in a beam search, projects each input's encoder states
    once and gives the result to each of its beams (generate hands it one identical copy per beam)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, states):
        beams = _beam_group(states.shape[0])
        if beams and states.dim() == 3 and states.shape[1] > 1:
            return self.forward(states[::beams]).repeat_interleave(beams, dim=0)
        return self.forward(states)


def share_cross_attention(model) -> bool:
    """Set `model` (an encoder-decoder on SDPA attention) to share its cross-attention reads among the beams of
    each input, and to reorder only its self-attention cache; False (and nothing changed) for any other model."""
    decoder = getattr(getattr(model, "model", None), "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not getattr(model.config, "is_encoder_decoder", False) or not layers or \
            model.config._attn_implementation != "sdpa" or not all(hasattr(x, "encoder_attn") for x in layers):
        return False
    AttentionInterface.register(ATTENTION, _attention)
    for layer in layers:
        layer.encoder_attn.zinfer_cross = True
        for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
            projection.forward = _PerInput(projection.forward)
    model.set_attn_implementation(ATTENTION)
    model._reorder_cache = reorder_self_attention  # generate's hook for a model's own reorder

    class Beams(type(model)):  # generate finds its decoding method on the class
        def _beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
            token = _beams.set(generation_config.num_beams)
            try:
                return super()._beam_search(input_ids, logits_processor, stopping_criteria, generation_config,
                                            *args, **kwargs)
            finally:
                _beams.reset(token)

    Beams.__name__ = Beams.__qualname__ = type(model).__name__
    model.__class__ = Beams
    return True


class _LastEncoding:
    """A Whisper encoder's forward that keeps its last output and gives it again (a new output object holding the
    same tensors: generate replaces them in its own copy) for equal features asked for the same outputs. Its
    `attention_mask` is not part of the key: Whisper's encoder takes it for compatibility and does not use it."""

    def __init__(self, forward):
        self.forward = forward
        self.features = self.key = self.out = None

    def __call__(self, input_features, *args, **kwargs):
        key = tuple(bool(kwargs.get(name)) for name in ("output_attentions", "output_hidden_states")) + (
            kwargs.get("return_dict") is not False,)
        extra = set(kwargs) - {"attention_mask", "output_attentions", "output_hidden_states", "return_dict"}
        if args or extra:
            return self.forward(input_features, *args, **kwargs)
        last = self.features
        if not (last is not None and self.key == key and last.shape == input_features.shape
                and last.dtype == input_features.dtype and torch.equal(last, input_features)):
            self.out = self.forward(input_features, **kwargs)
            self.features, self.key = input_features.clone(), key
        out = self.out
        return type(out)(**dict(out.items())) if hasattr(out, "items") else out


def remember_last_encoding(model) -> bool:
    """Have a Whisper model's encoder give its last output again for the same features (see above); False for any
    other model."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if type(encoder).__name__ != "WhisperEncoder":
        return False
    encoder.forward = _LastEncoding(encoder.forward)
    return True
