"""Audio models, speech to text (issue 34): Xinference's custom audio JSON registered, a tiny random Whisper (and
its English-only twin) launched on a real mesh with a gateway, and OpenAI's /v1/audio/transcriptions and
/translations driven by the openai SDK, xinference-client, the Python client and the CLI. Every text is compared
with transformers' own speech-recognition pipeline on the same audio in this process."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json

import numpy as np
import pytest
import requests
import soundfile
from xinference_client import RESTfulClient

from tests.conftest import served_mesh
from tests.test_dropin import ok, refused
from tests.test_gateway import oai
from zinfer.services.worker.instance.backends.speech_backend import CHUNK_SECONDS, decode_audio
from zinfer.services.worker.instance.backends.tts_backend import encode_audio, sentences
from zinfer.shared.handles import LLMHandle
from zinfer.shared.tinyaudio import tone_wav

BATCH = 8  # the engine's max_batch_size on a CPU for this tiny model (default_batch): windows per batch


def audio_definition(path, name: str, multilingual: bool = True, ability: str = "audio2text") -> dict:
    """Xinference's custom audio JSON, as its page writes it."""
    return {"version": 2, "model_name": name, "model_family": "whisper", "model_ability": [ability],
            "multilingual": multilingual, "language": ["en", "fr"] if multilingual else ["en"],
            "default_model_config": {}, "default_transcription_config": {}, "engine": "transformers",
            "model_uri": f"file://{path}", "model_id": None, "model_hub": "huggingface", "model_revision": None,
            "virtualenv": {"packages": []}, "cache_config": None, "is_builtin": False}


@pytest.fixture(scope="module")
def au(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "audio", [], gateway=True) as m:
        c = m.client
        c.register_model("audio", json.dumps(audio_definition(tiny_models["whisper"], "my-whisper")))
        c.register_model("audio", json.dumps(audio_definition(tiny_models["whisper_en"], "my-whisper-en", False)))
        c.launch_model(model_name="my-whisper", model_type="audio", model_uid="whisper")
        c.launch_model(model_name="my-whisper-en", model_type="audio", model_uid="whisper-en")
        yield m


@pytest.fixture(scope="module")
def pipes(tiny_models):
    """transformers' own pipeline on each model, in this process."""
    from transformers import pipeline

    return {uid: pipeline("automatic-speech-recognition", model=str(tiny_models[key]), device="cpu")
            for uid, key in (("whisper", "whisper"), ("whisper-en", "whisper_en"))}


def raw(pipes, uid: str, wav: bytes, **kwargs) -> dict:
    audio = decode_audio(wav, 16000)
    return pipes[uid](audio, chunk_length_s=CHUNK_SECONDS, batch_size=BATCH, **kwargs)


def test_a_wav_through_the_openai_sdk_gives_the_pipelines_text(au, pipes):
    wav = tone_wav(5)
    got = oai(au).audio.transcriptions.create(model="whisper", file=("speech.wav", wav))
    assert got.text == raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"]
    assert got.text  # the random model says something
    other = oai(au).audio.transcriptions.create(model="whisper", file=("other.wav", tone_wav(4, freq=300, seed=3)))
    assert other.text != got.text  # and what it says depends on the audio


def test_translation_and_language_reach_the_model(au, pipes):
    wav = tone_wav(5, seed=1)
    got = oai(au).audio.translations.create(model="whisper", file=("speech.wav", wav))
    assert got.text == raw(pipes, "whisper", wav, generate_kwargs={"task": "translate"})["text"]
    fr = oai(au).audio.transcriptions.create(model="whisper", file=("speech.wav", wav), language="fr")
    assert fr.text == raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe", "language": "fr"})["text"]
    assert len({got.text, fr.text, raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"]}) > 1


def test_each_response_format(au, pipes):
    wav = tone_wav(6, seed=2)
    timed = raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"}, return_timestamps=True)
    client = oai(au)
    verbose = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav), response_format="verbose_json")
    assert verbose.text == timed["text"] and verbose.duration == 6.0 and verbose.task == "transcribe"
    assert [s.text for s in verbose.segments] == [c["text"] for c in timed["chunks"]]
    starts = [s.start for s in verbose.segments]
    assert starts == sorted(starts) and all(s.end >= s.start for s in verbose.segments)
    text = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav), response_format="text")
    assert text == raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"]
    srt = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav), response_format="srt")
    vtt = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav), response_format="vtt")
    first = verbose.segments[0]
    assert srt.startswith("1\n00:00:") and " --> " in srt and first.text.strip() in srt
    assert vtt.startswith("WEBVTT\n\n00:00:") and f"{first.text.strip()}\n" in vtt and "," not in vtt.split("\n")[2]
    words = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav), response_format="verbose_json",
                                               timestamp_granularities=["word"])
    want = raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"}, return_timestamps="word")
    assert [w.word for w in words.words] == [c["text"] for c in want["chunks"]]


def test_a_minute_of_audio_is_transcribed_in_windows(au, pipes):
    wav = tone_wav(60, seed=4)
    got = oai(au).audio.transcriptions.create(model="whisper", file=("long.wav", wav), response_format="verbose_json")
    chunked = raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"}, return_timestamps=True)
    assert got.text == chunked["text"] and got.duration == 60.0
    first_window = pipes["whisper"](decode_audio(wav, 16000)[:16000 * 30], generate_kwargs={"task": "transcribe"})
    assert got.text != first_window["text"]  # more than the first 30 seconds' text: the rest was heard too
    assert max(s.end for s in got.segments) > 30


def test_concurrent_transcriptions_each_equal_their_own(au):
    client = oai(au)
    wavs = [tone_wav(2 + i % 3, freq=200 + 90 * i, seed=10 + i) for i in range(4)]
    alone = [client.audio.transcriptions.create(model="whisper", file=("a.wav", w)).text for w in wavs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda w: client.audio.transcriptions.create(model="whisper",
                                                                                file=("a.wav", w)).text, wavs))
    assert together == alone and len(set(alone)) > 1


def test_an_english_only_model_gets_no_language_or_task(au, pipes):
    wav = tone_wav(5)
    got = oai(au).audio.transcriptions.create(model="whisper-en", file=("a.wav", wav))
    assert got.text == raw(pipes, "whisper-en", wav)["text"]  # no generate_kwargs at all
    url = f"{au.gateway_url}/v1/audio/translations"
    headers = {"Authorization": f"Bearer {au.admin_api_key}"}
    r = requests.post(url, headers=headers, data={"model": "whisper-en"}, files={"file": ("a.wav", wav)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "English only" in r.text
    r = requests.post(f"{au.gateway_url}/v1/audio/transcriptions", headers=headers,
                      data={"model": "whisper-en", "language": "fr"}, files={"file": ("a.wav", wav)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"


@pytest.mark.parametrize("fmt", ["FLAC", "MP3", "OGG"])
def test_other_formats_and_rates_are_decoded_in_the_instance(au, pipes, fmt):
    """A 44.1 kHz stereo file: decoded with soundfile, mixed to mono and resampled in the instance; the text is
    the pipeline's on the same decoded samples."""
    t = np.arange(44100 * 3) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 330 * t), np.sin(2 * np.pi * 550 * t)], axis=1).astype(np.float32) * 0.3
    buf = io.BytesIO()
    soundfile.write(buf, stereo, 44100, format=fmt)
    data = buf.getvalue()
    got = oai(au).audio.transcriptions.create(model="whisper", file=(f"a.{fmt.lower()}", data))
    assert got.text == raw(pipes, "whisper", data, generate_kwargs={"task": "transcribe"})["text"]


def test_bad_input_is_a_400_naming_the_field_and_the_instance_keeps_serving(au, pipes):
    url = f"{au.gateway_url}/v1/audio/transcriptions"
    headers = {"Authorization": f"Bearer {au.admin_api_key}"}
    wav = tone_wav(2)

    def post(data, files):
        return requests.post(url, headers=headers, data=data, files=files, timeout=60)

    for data, files, field in (
            ({"model": "whisper"}, {"file": ("a.wav", b"RIFF....WAVEfmt this is not audio")}, "file"),
            ({"model": "whisper"}, {"file": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(64))}, "file"),
            ({"model": "whisper"}, None, "file"),
            ({"model": "whisper", "response_format": "docx"}, {"file": ("a.wav", wav)}, "response_format"),
            ({"model": "whisper", "temperature": "hot"}, {"file": ("a.wav", wav)}, "temperature"),
            ({"model": "whisper", "temperature": "3"}, {"file": ("a.wav", wav)}, "temperature"),
            ({"model": "whisper", "language": "xx"}, {"file": ("a.wav", wav)}, "language"),
            ({"model": "whisper", "timestamp_granularities[]": "word"}, {"file": ("a.wav", wav)},
             "timestamp_granularities"),
            ({"model": "custom-llama-2"}, {"file": ("a.wav", wav)}, "model_uid")):
        r = post(data, files or {"nothing": ("x", b"")})
        assert r.status_code == 400, (data, r.text)
        assert r.json()["error"]["param"] == field, (data, r.text)
    r = requests.post(url, headers=headers, json={"model": "whisper"}, timeout=60)  # not a form at all
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert post({"model": "nobody"}, {"file": ("a.wav", wav)}).status_code == 404
    got = oai(au).audio.transcriptions.create(model="whisper", file=("a.wav", wav))
    assert got.text == raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"]


def test_xinference_client_and_the_python_client(au, pipes):
    wav = tone_wav(3, seed=5)
    want = raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"]
    handle = RESTfulClient(au.gateway_url, api_key=au.admin_api_key).get_model("whisper")
    assert handle.transcriptions(wav) == {"text": want}
    assert handle.translations(wav)["text"] == raw(pipes, "whisper", wav,
                                                   generate_kwargs={"task": "translate"})["text"]
    ours = au.client.get_model("whisper")
    assert ours.transcriptions(wav) == {"text": want}
    assert ours.transcriptions(wav, response_format="text") == want
    assert ours.transcriptions(wav, response_format="srt").startswith("1\n00:00:00,000 --> ")
    with pytest.raises(Exception, match="is an audio model: it cannot generate"):
        au.client.get_model("whisper-en").generate("hello")
    with pytest.raises(Exception, match="not an audio model"):
        LLMHandle(au.client, "any-llm").transcriptions(wav)  # said before anything is sent


def test_cli_transcribe_and_what_list_shows(au, pipes, tmp_path):
    wav = tone_wav(3, seed=6)
    path = tmp_path / "speech.wav"
    path.write_bytes(wav)
    out = ok(au, "transcribe", "-u", "whisper", str(path))
    assert out == raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"] + "\n"
    srt = ok(au, "transcribe", "-u", "whisper", str(path), "-f", "srt")
    assert srt.startswith("1\n00:00:00,000 --> ")
    assert "English only" in refused(au, "transcribe", "-u", "whisper-en", str(path), "--translate")
    listing = ok(au, "list")
    assert "whisper-en" in listing and "audio" in listing


def test_the_audio_json_round_trips_and_the_rest_is_refused_by_name(au, tiny_models):
    c = au.client
    given = audio_definition(tiny_models["whisper"], "my-whisper")
    back = c.get_model_registration("audio", "my-whisper")
    want = {k: v for k, v in given.items() if v is not None and k != "virtualenv"}
    assert {k: back.get(k) for k in want} == want  # its own form, as given
    assert back["virtualenv"]["packages"] == []  # (with the pip settings Xinference's page lists, null)
    names = [r["model_name"] for r in c.list_model_registrations("audio")]
    assert "my-whisper" in names and "whisper-large-v3" in names  # built-ins under Xinference's names
    for change, field in (({"virtualenv": {"packages": ["whisperx"]}}, "virtualenv.packages"),
                          ({"is_builtin": True}, "is_builtin"), ({"model_ability": ["speak"]}, "model_ability"),
                          ({"engine": "funasr"}, "engine"), ({"modle_uri": "x"}, "modle_uri")):
        with pytest.raises(Exception, match=field.replace(".", r"\.")):
            c.register_model("audio", json.dumps({**given, "model_name": "bad-audio", **change}))
    with pytest.raises(Exception, match="--model-type audio"):
        c.register_model("LLM", json.dumps({**given, "model_name": "wrong-type"}))


# ---------------------------------------------------------------- text to speech


@pytest.fixture(scope="module")
def tts(au, tiny_models):
    au.client.register_model("audio", json.dumps({**audio_definition(tiny_models["vits"], "my-vits",
                                                                     ability="text2audio"), "model_family": "vits"}))
    au.client.launch_model(model_name="my-vits", model_type="audio", model_uid="vits")
    return au


def vits_waveform(tiny_models, text: str, speed: float = 1.0) -> np.ndarray:
    """The model's own output for the text, in this process (its noise drawn from seed 0, as the served default)."""
    import torch
    from transformers import VitsModel, VitsTokenizer

    model = VitsModel.from_pretrained(tiny_models["vits"]).eval()
    model.speaking_rate = speed
    inputs = VitsTokenizer.from_pretrained(tiny_models["vits"])(text, return_tensors="pt")
    torch.manual_seed(0)
    with torch.inference_mode():
        return model(**inputs).waveform[0].numpy()


def test_speech_is_the_models_own_waveform_in_each_format(tts, tiny_models):
    text = "hello world, this is a tiny voice."
    want = vits_waveform(tiny_models, text)
    client = oai(tts)
    wav = client.audio.speech.create(model="vits", voice="alloy", input=text, response_format="wav").content
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert rate == 16000 and samples.shape == want.shape
    assert np.max(np.abs(samples - np.clip(want, -1, 1))) <= 1.01 / 32767  # the same samples, at 16 bits
    pcm = client.audio.speech.create(model="vits", voice="alloy", input=text, response_format="pcm").content
    assert np.array_equal(np.frombuffer(pcm, "<i2"), soundfile.read(io.BytesIO(wav), dtype="int16")[0])
    flac = client.audio.speech.create(model="vits", voice="alloy", input=text, response_format="flac").content
    lossless, rate = soundfile.read(io.BytesIO(flac), dtype="float32")
    assert rate == 16000 and np.max(np.abs(lossless - np.clip(want, -1, 1))) <= 1.01 / 32767
    mp3 = client.audio.speech.create(model="vits", voice="alloy", input=text).content  # OpenAI's default: mp3
    decoded, rate = soundfile.read(io.BytesIO(mp3), dtype="float32")
    assert rate == 16000 and abs(len(decoded) - len(want)) < 2048 and mp3[:2] in (b"ID", b"\xff\xfb", b"\xff\xf3")
    slow = client.audio.speech.create(model="vits", voice="alloy", input=text, response_format="wav", speed=0.5)
    assert soundfile.read(io.BytesIO(slow.content))[0].shape == vits_waveform(tiny_models, text, 0.5).shape


def test_speech_through_the_clients_and_the_cli(tts, tiny_models, tmp_path):
    text = "one two three"
    want = vits_waveform(tiny_models, text)
    wav = RESTfulClient(tts.gateway_url, api_key=tts.admin_api_key).get_model("vits").speech(
        text, response_format="wav")
    assert soundfile.read(io.BytesIO(wav))[0].shape == want.shape
    assert tts.client.get_model("vits").speech(text, response_format="wav") == wav
    out = tmp_path / "said.wav"
    assert "wrote" in ok(tts, "speak", "-u", "vits", text, "-o", str(out))
    assert out.read_bytes() == wav


def test_speech_streamed_a_sentence_at_a_time(tts, tiny_models):
    """stream_format audio (openai SDK), sse, Xinference's stream (xinference-client, the Python client): each
    sentence's audio as it is made, equal to the model's own waveform for that sentence."""
    text = "hello world. this is a tiny voice! one two three"
    parts = sentences(text)
    assert len(parts) == 3
    want = b"".join(encode_audio(vits_waveform(tiny_models, part), 16000, "pcm") for part in parts)
    with oai(tts).audio.speech.with_streaming_response.create(model="vits", voice="alloy", input=text,
                                                              response_format="pcm", stream_format="audio") as r:
        assert r.headers["content-type"] == "audio/pcm"
        assert b"".join(r.iter_bytes()) == want
    chunks = list(tts.client.get_model("vits").speech(text, response_format="pcm", stream=True))
    assert len(chunks) == 3 and b"".join(chunks) == want  # one message a sentence
    xinf = RESTfulClient(tts.gateway_url, api_key=tts.admin_api_key).get_model("vits")
    wav = b"".join(xinf.speech(text, response_format="wav", stream=True))
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")  # a header of unknown length, then the samples
    assert rate == 16000 and np.array_equal(samples, np.frombuffer(want, "<i2"))
    r = requests.post(f"{tts.gateway_url}/v1/audio/speech", headers={"Authorization": f"Bearer {tts.admin_api_key}"},
                      json={"model": "vits", "input": text, "response_format": "pcm", "stream_format": "sse"},
                      stream=True, timeout=60)
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 3 + ["speech.audio.done"]
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == want


def test_bad_speech_requests_are_a_400_naming_the_field(tts):
    url = f"{tts.gateway_url}/v1/audio/speech"
    headers = {"Authorization": f"Bearer {tts.admin_api_key}"}
    for body, field in (({"input": "hi", "response_format": "ogg"}, "response_format"),
                        ({"input": ""}, "input"), ({"input": "hi", "speed": 10}, "speed"),
                        ({"input": "hi", "volume": 3}, "volume"), ({}, "input"),
                        ({"input": "hi", "stream": True}, "response_format"),  # an mp3 is one whole
                        ({"input": "hi", "response_format": "pcm", "stream_format": "ws"}, "stream_format")):
        r = requests.post(url, headers=headers, json={"model": "vits", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    r = requests.post(url, headers=headers, json={"model": "whisper", "input": "hi"}, timeout=60)
    assert r.status_code == 400 and "cannot speak" in r.text
    r = requests.post(f"{tts.gateway_url}/v1/audio/transcriptions", headers=headers, data={"model": "vits"},
                      files={"file": ("a.wav", tone_wav(1))}, timeout=60)
    assert r.status_code == 400 and "cannot transcribe" in r.text
    assert requests.post(url, headers=headers, json={"model": "vits", "input": "still here"}, timeout=60).ok


def test_an_idle_audio_instance_unloads_and_its_next_request_loads_it_again(au, pipes):
    """keep_alive 2 s: unloaded once idle; the next transcription over HTTP loads it again and gets the same text."""
    c = au.client
    c.launch_model(model_name="my-whisper", model_type="audio", model_uid="w-idle", keep_alive="2s")
    wav = tone_wav(2, seed=8)
    first = oai(au).audio.transcriptions.create(model="w-idle", file=("a.wav", wav)).text
    au.wait(lambda: c.describe_model("w-idle")["state"] == "idle-unloaded" or None, timeout=30)
    loads = c.describe_model("w-idle")["loads"]
    again = oai(au).audio.transcriptions.create(model="w-idle", file=("a.wav", wav)).text
    assert again == first == raw(pipes, "whisper", wav, generate_kwargs={"task": "transcribe"})["text"]
    assert c.describe_model("w-idle")["loads"] == loads + 1
    c.terminate_model("w-idle")


def test_beam_search_sharing_what_beams_share_gives_transformers_own_sequences(tiny_models):
    """The speech engine's generate (backends/reuse.py: cross-attention keys and values projected and read once per
    input, that cache never reordered, the encoder's output reused after language detection) against transformers'
    own, 5 beams over batches of one and of three different inputs: the same tokens and scores, bit for bit, and
    real tokens (not only the prompt)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from zinfer.services.worker.instance.backends.reuse import remember_last_encoding, share_cross_attention

    path = tiny_models["whisper"]
    stock = WhisperForConditionalGeneration.from_pretrained(path).eval()
    ours = WhisperForConditionalGeneration.from_pretrained(path).eval()
    assert share_cross_attention(ours) and remember_last_encoding(ours)
    processor = WhisperProcessor.from_pretrained(path)
    audio = [decode_audio(tone_wav(5, freq=freq, seed=i), 16000) for i, freq in enumerate((200, 900, 3100))]
    kwargs = {"num_beams": 5, "max_new_tokens": 12, "min_new_tokens": 12, "task": "transcribe", "language": "en",
              "return_dict_in_generate": True, "output_scores": True}
    for batch, language in ((audio[:1], "en"), (audio, "en"), (audio, None)):  # None: detected, then encoded again
        features = processor(batch, sampling_rate=16000, return_tensors="pt").input_features
        asked = {**kwargs, "language": language}
        with torch.inference_mode():
            want, got = stock.generate(features, **asked), ours.generate(features, **asked)
        assert torch.equal(want.sequences, got.sequences)
        assert torch.equal(want.sequences_scores, got.sequences_scores)  # the beams' scores, bit for bit
        assert want.sequences.shape[1] >= 12
    assert len({tuple(row) for row in got.sequences.tolist()}) > 1  # the inputs differ, and so do their texts
