"""OpenAI's speech-to-text shapes (shared/transcripts.py): the request's checks and each response_format."""

from __future__ import annotations

import pytest

from zinfer.shared import protocol as p
from zinfer.shared import transcripts
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.serving import Segment, Word

REPLY = p.Transcription(model="w", text=" Hello there. General Kenobi.", duration=3725.5, task="transcribe",
                        language="en", segments=[Segment(id=0, start=0.0, end=1.25, text=" Hello there."),
                                                 Segment(id=1, start=3600.5, end=3725.5, text=" General Kenobi.")])


def test_each_response_format():
    assert transcripts.render(REPLY, "json") == ({"text": REPLY.text}, "application/json")
    assert transcripts.render(REPLY, None)[0] == {"text": REPLY.text}
    assert transcripts.render(REPLY, "text")[0] == REPLY.text
    srt, media = transcripts.render(REPLY, "srt")
    assert srt == ("1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n"
                   "2\n01:00:00,500 --> 01:02:05,500\nGeneral Kenobi.\n")
    assert media.startswith("application/x-subrip")
    vtt, media = transcripts.render(REPLY, "vtt")
    assert vtt == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello there.\n\n"
                   "01:00:00.500 --> 01:02:05.500\nGeneral Kenobi.\n")
    assert media.startswith("text/vtt")
    verbose, _ = transcripts.render(REPLY, "verbose_json")
    assert verbose == {"task": "transcribe", "language": "en", "duration": 3725.5, "text": REPLY.text,
                       "segments": [{"id": 0, "start": 0.0, "end": 1.25, "text": " Hello there."},
                                    {"id": 1, "start": 3600.5, "end": 3725.5, "text": " General Kenobi."}]}
    words = p.Transcription(model="w", text=" a b", duration=2.0, words=[Word(word=" a", start=0.0, end=0.5),
                                                                          Word(word=" b", start=0.5, end=1.0)])
    assert transcripts.render(words, "verbose_json")[0]["words"] == [{"word": " a", "start": 0.0, "end": 0.5},
                                                                       {"word": " b", "start": 0.5, "end": 1.0}]
    assert transcripts.render(words, "srt")[0].startswith("1\n00:00:00,000 --> 00:00:00,500\na\n")  # words as cues
    untimed = p.Transcription(model="w", text="all of it", duration=2.0)
    assert transcripts.render(untimed, "vtt")[0] == "WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nall of it\n"


def test_the_request_asks_for_the_timestamps_its_format_needs():
    def ask(**kw):
        return transcripts.transcribe_message("w", b"RIFF", "transcribe", **kw)

    assert ask().timestamps == "none" and ask(response_format="text").timestamps == "none"
    assert ask(response_format="srt").timestamps == ask(response_format="vtt").timestamps == "segment"
    assert ask(response_format="verbose_json").timestamps == "segment"
    assert ask(response_format="verbose_json", timestamp_granularities=["word", "segment"]).timestamps == "word"
    assert ask(temperature="0.4").temperature == 0.4 and ask(language="").language is None


@pytest.mark.parametrize("kw, field", [
    ({"response_format": "docx"}, "response_format"),
    ({"timestamp_granularities": ["word"]}, "timestamp_granularities"),
    ({"response_format": "verbose_json", "timestamp_granularities": ["sentence"]}, "timestamp_granularities"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 1.5}, "temperature"),
    ({"language": "x" * 40}, "language"),
    ({"prompt": "p" * 5000}, "prompt"),
])
def test_bad_fields_are_refused_by_name(kw, field):
    with pytest.raises(InvalidRequest) as err:
        transcripts.transcribe_message("w", b"RIFF", "transcribe", **kw)
    assert err.value.field == field


def test_the_file_is_required_and_bounded():
    with pytest.raises(InvalidRequest) as err:
        transcripts.transcribe_message("w", b"", "transcribe")
    assert err.value.field == "file"
    with pytest.raises(InvalidRequest) as err:
        transcripts.transcribe_message("w", bytes(p.MAX_AUDIO_BYTES + 1), "transcribe")
    assert err.value.field == "file"
