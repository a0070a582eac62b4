"""The tiny models' byte-level BPE tokenizer, trained in a second on a small corpus (shared/tinymodels.py's Llama
and shared/tinyvision.py's LLaVA share it)."""

from __future__ import annotations

SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """The quick brown fox jumps over the lazy dog. What is the largest animal in the world?
The blue whale is the largest animal that has ever lived. Octopuses have three hearts and blue blood.
A model-serving mesh registers custom models, launches them on GPUs or the CPU, and answers requests.
Hello, how are you today? I am fine, thank you. Tell me a story about a dragon and a knight.
Once upon a time there was a small village by the sea where fishermen told stories every night.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation! Questions? Lists; colons: dashes - and quotes "x".
"""


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return tok
