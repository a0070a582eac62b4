"""Pure logic under the mesh: model-file checks before an engine sees a file, and how a dead instance process's
cause is told (no processes started here)."""

from __future__ import annotations

import json
import signal
import struct

import pytest

from zinfer.services.worker import checks
from zinfer.services.worker.host.supervisor import describe_exit, last_frame
from zinfer.shared.errors import InvalidRequest


def write_gguf(path, tokens: list[str], model: str = "llama") -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def test_a_sentencepiece_vocabulary_needs_every_byte(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good, ["<unk>", "<s>", "</s>", *BYTES, "\u2581hello"])
    checks.check_gguf(good)
    short = tmp_path / "short.gguf"
    write_gguf(short, ["<unk>", "<s>", "</s>", *BYTES[:200], "\u2581hello"])
    with pytest.raises(InvalidRequest, match=r"without byte tokens for 56 of the 256 bytes \(first: <0xC8>\)") as err:
        checks.check_gguf(short)
    assert err.value.field == "model_uri" and str(short) in err.value.message
    # A byte-level BPE vocabulary ("gpt2") has no <0xXX> pieces and needs none.
    write_gguf(tmp_path / "bpe.gguf", ["a", "b", "ab"], model="gpt2")
    checks.check_gguf(tmp_path / "bpe.gguf")


def test_duplicate_tokens_and_damaged_files_are_refused(tmp_path):
    dup = tmp_path / "dup.gguf"
    write_gguf(dup, ["<unk>", "<s>", "</s>", *BYTES, "\u2581hi", "\u2581hi"])
    with pytest.raises(InvalidRequest, match="entries 259 and 260 both reading"):
        checks.check_gguf(dup)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(dup.read_bytes()[:100])
    with pytest.raises(InvalidRequest, match="is not a readable GGUF file"):
        checks.check_gguf(cut)


def test_hugging_face_folders_are_checked(tmp_path):
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(InvalidRequest, match="config.json: is not valid JSON"):
        checks.check_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(InvalidRequest, match="must hold a JSON object, not list"):
        checks.check_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "modules.json").write_text("[]")  # sentence-transformers' modules.json is a list
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    checks.check_hf_folder(tmp_path)
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    with pytest.raises(InvalidRequest, match="is truncated: its tensors need") as err:
        checks.check_hf_folder(tmp_path)
    assert err.value.field == "model_uri"
    weights.write_bytes(struct.pack("<Q", 10**9) + header)
    with pytest.raises(InvalidRequest, match="header claims"):
        checks.check_hf_folder(tmp_path)


FAULT = """Fatal Python error: Segmentation fault

Thread 0x00007f00aa (most recent call first):
  File "/x/shared/transport.py", line 310 in serve

Current thread 0x00007f00bb (most recent call first):
  File "/x/services/worker/instance/backends/llama_cpp_backend.py", line 300 in step
  File "/x/services/worker/instance/llm_batcher.py", line 120 in step
"""


def test_the_cause_of_a_death_names_the_signal_and_the_innermost_frame():
    assert last_frame(FAULT) == "step (llama_cpp_backend.py:300)"
    assert describe_exit(-signal.SIGSEGV, FAULT) == \
        "its process was killed by SIGSEGV in step (llama_cpp_backend.py:300)"
    assert describe_exit(-signal.SIGKILL, "") == "its process was killed by SIGKILL"
    assert describe_exit(3, "") == "its process exited with code 3"
    assert last_frame("garbage") == ""
