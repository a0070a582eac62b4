"""Tiny random audio models for tests and benchmarks, built offline from configs: a Whisper (a byte-level BPE of a
few hundred tokens with Whisper's special tokens: languages, tasks, timestamps), its English-only twin, and a
VITS text-to-speech model with a character tokenizer.

Their weights are random, so their text is gibberish; what they show is that zinfer serves what transformers'
own pipeline gives for the same audio.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

WHISPER_LANGUAGES = ("en", "fr", "de", "es")
WHISPER_MAX_LENGTH = 48  # tokens a window decodes at most: keeps a random model's run short


def _whisper_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    corpus = ["the quick brown fox jumps over the lazy dog", "hello world this is a tiny whisper model",
              "speech to text and text to speech", "one two three four five six seven eight nine ten"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(vocab))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m)
                                                                  for m in merges) + "\n")
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), unk_token=eot, bos_token=eot,
                           eos_token=eot, pad_token=eot)
    specials = ["<|startoftranscript|>", *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
                *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]  # timestamps follow <|notimestamps|>, as Whisper's
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def build_tiny_whisper(out: Path, seed: int = 0, width: int = 32, layers: int = 1, heads: int = 2,
                       init_std: float = 1.0) -> Path:
    """A random Whisper (80 mel bins; by default one encoder and one decoder layer of width 32; the benchmark's
    has whisper-tiny's shape: width 384, 4 layers, 6 heads) with its processor and a multilingual generation
    config, saved at `out`."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = _whisper_tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, encoder_layers=layers, decoder_layers=layers,
                           d_model=width, encoder_attention_heads=heads, decoder_attention_heads=heads,
                           encoder_ffn_dim=4 * width if width > 32 else 64, decoder_ffn_dim=4 * width if width > 32
                           else 64, max_source_positions=1500, max_target_positions=448,
                           decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                           # large random weights: the tiny model's text depends on the audio (0.02: it did not)
                           init_std=init_std)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=WHISPER_MAX_LENGTH, is_multilingual=True,
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50, suppress_tokens=[], begin_suppress_tokens=[eot], alignment_heads=[[0, 0]])
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(out)
    return out


def english_only(whisper: Path, out: Path) -> Path:
    """The same model as an English-only one (as whisper-tiny.en: no language or task tokens are forced)."""
    shutil.copytree(whisper, out, dirs_exist_ok=True)
    config = json.loads((out / "generation_config.json").read_text())
    config["is_multilingual"] = False
    (out / "generation_config.json").write_text(json.dumps(config, indent=2))
    return out


VITS_CHARACTERS = " abcdefghijklmnopqrstuvwxyz',.?!-"


def build_tiny_vits(out: Path, seed: int = 0, speakers: int = 1) -> Path:
    """A random VITS (MMS-TTS's architecture, width 32) with a character tokenizer, saved at `out`: 16 kHz."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(VITS_CHARACTERS)}, "<unk>": len(VITS_CHARACTERS) + 1}
    (out / "vocab.json").write_text(json.dumps(vocab))
    tok = VitsTokenizer(str(out / "vocab.json"), pad_token="<pad>", unk_token="<unk>", add_blank=True,
                        normalize=True, phonemize=False, is_uroman=False)
    config = VitsConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        ffn_dim=64, flow_size=32, spectrogram_bins=65, upsample_initial_channel=64,
                        upsample_rates=[8, 8, 4], upsample_kernel_sizes=[16, 16, 8], resblock_kernel_sizes=[3],
                        resblock_dilation_sizes=[[1, 3]], posterior_encoder_num_wavenet_layers=2,
                        prior_encoder_num_flows=2, prior_encoder_num_wavenet_layers=2,
                        duration_predictor_num_flows=2, duration_predictor_filter_channels=32,
                        depth_separable_num_layers=2, sampling_rate=16000, num_speakers=speakers,
                        speaker_embedding_size=16 if speakers > 1 else 0)
    torch.manual_seed(seed)
    VitsModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_audio(root: Path, force: bool = False) -> dict[str, Path]:
    whisper, english, vits = root / "tiny-whisper", root / "tiny-whisper-en", root / "tiny-vits"
    if force or not (whisper / "model.safetensors").exists():
        build_tiny_whisper(whisper)
    if force or not (english / "model.safetensors").exists():
        english_only(whisper, english)
    if force or not (vits / "model.safetensors").exists():
        build_tiny_vits(vits)
    return {"whisper": whisper, "whisper_en": english, "vits": vits}


def tone_wav(seconds: float, rate: int = 16000, freq: float = 440.0, seed: int = 0) -> bytes:
    """A WAV file of a tone with a little noise (16-bit PCM, mono)."""
    import io

    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.RandomState(seed).randn(t.size) * 0.05
    samples = (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
