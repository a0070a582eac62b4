"""Vision-language models in chat (issue 34): a tiny random LLaVA (CLIP tower + projector + tiny Llama, built from
configs) registered with the `vision` ability and family `other`, launched on a real mesh with a gateway, and
OpenAI's image_url parts sent by the openai SDK and the Python client. Every answer is compared with the model's own
`generate` on its processor's inputs in this process; bad images, limits and blocked URLs are refused by name."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import json
import threading

import pytest
import requests

from tests.conftest import served_mesh
from tests.test_gateway import oai
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.fromfiles import registration_from_path
from zinfer.shared.tinyvision import GGUF_TEMPLATE, IMAGE_TOKENS, MMPROJ, llama_cpp_chat, png

MAX_PIXELS = 64 * 64  # this mesh's max_image_pixels: a 100 x 50 image is over it
MAX_IMAGES = 3


def vision_definition(path) -> dict:
    return {"version": 2, "model_name": "my-llava", "model_family": "other", "model_lang": ["en"],
            "model_ability": ["chat", "vision"], "context_length": 2048,
            "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1, "quantization": "none",
                             "model_uri": f"file://{path}"}]}


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def asking(text: str, *images: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": data_uri(image)}} for image in images]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder whose images file:// URLs may name (image_folders)."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def vis(tmp_path_factory, tiny_models, folder):
    env = {"ZINFER_IMAGE_URL_FETCH": "true", "ZINFER_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
           "ZINFER_MAX_IMAGES": str(MAX_IMAGES), "ZINFER_IMAGE_FOLDERS": str(folder)}
    with served_mesh(tmp_path_factory, tiny_models, "vision", ["hf"], gateway=True, env=env) as m:
        m.client.register_model("LLM", json.dumps(vision_definition(tiny_models["llava"])))
        m.client.launch_model(model_name="my-llava", model_uid="llava", model_format="pytorch")
        yield m


@pytest.fixture(scope="module")
def own(tiny_models):
    """The model's own generate on its processor's inputs, in this process: (token count, text) of a chat."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_models["llava"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def run(messages: list[dict], max_tokens: int = 12) -> tuple[int, str]:
        hf = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
            {"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1])))}
            if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]
        inputs = processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        n = inputs["input_ids"].shape[1]
        return n, processor.decode(out[0, n:], skip_special_tokens=True)

    return run


def test_an_image_through_the_openai_sdk_gives_the_models_own_text(vis, own):
    messages = asking("What is in this picture?", png(40, 30, seed=1))
    got = oai(vis).chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0)
    n, text = own(messages)
    assert got.choices[0].message.content == text
    assert got.usage.prompt_tokens == n  # the image's tokens counted
    three = oai(vis).chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0, n=3)
    assert [c.message.content for c in three.choices] == [text] * 3  # the others take the first one's prefill
    text_only = [{"role": "user", "content": "What is in this picture?"}]
    plain = oai(vis).chat.completions.create(model="llava", messages=text_only, max_tokens=12, temperature=0)
    assert got.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_TOKENS + 1  # its tokens and a newline
    assert plain.choices[0].message.content == own(text_only)[1]
    other = oai(vis).chat.completions.create(model="llava", messages=asking("What is in this picture?",
                                             png(40, 30, seed=2)), max_tokens=12, temperature=0)
    assert other.choices[0].message.content != text  # what it says depends on the image


def test_two_images_streamed_and_concurrent_chats_with_and_without_images(vis, own):
    two = asking("Compare these.", png(20, 20, seed=3), png(30, 20, seed=4))
    chunks = oai(vis).chat.completions.create(model="llava", messages=two, max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == own(two)[1]
    chats = [asking(f"Picture {i}?", png(24, 24, seed=10 + i)) if i % 2 else
             [{"role": "user", "content": f"Say something about {i}."}] for i in range(6)]

    def ask(messages):
        out = vis.client.get_model("llava").chat(messages=messages, generate_config={"max_tokens": 12,
                                                                                        "temperature": 0})
        return out["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # batched with each other in the instance
        got = list(pool.map(ask, chats))
    assert got == [own(messages)[1] for messages in chats]


def test_the_responses_and_messages_apis_take_images(vis, own):
    """OpenAI's Responses API (input_image) and Anthropic's Messages API (an image block, base64) reach the model as
    the chat's image parts do."""
    import anthropic

    image = png(36, 28, seed=6)
    want = own(asking("Describe it.", image), 10)[1]
    out = oai(vis).responses.create(model="llava", max_output_tokens=10, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Describe it."},
                                     {"type": "input_image", "image_url": data_uri(image)}]}])
    assert out.output_text == want
    client = anthropic.Anthropic(base_url=vis.gateway_url, api_key=vis.admin_api_key, max_retries=0, timeout=60)
    said = client.messages.create(model="llava", max_tokens=10, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()}}]}])
    assert said.content[0].text == want


def test_image_refusals_of_the_responses_and_messages_apis_name_the_callers_fields(vis):
    """The chat's own positions (an instructions or system message shifts them) are not what the caller sent."""
    broken = data_uri(png(16, 16)[:-30])
    r = requests.post(f"{vis.gateway_url}/v1/responses", timeout=60,
                      headers={"Authorization": f"Bearer {vis.admin_api_key}"},
                      json={"model": "llava", "instructions": "Be brief.", "max_output_tokens": 4, "input": [
                          {"role": "user", "content": [{"type": "input_text", "text": "Look."},
                                                       {"type": "input_image", "image_url": broken}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].content[1].image_url", r.text
    assert "input[0].content[1]" in r.json()["error"]["message"]
    r = requests.post(f"{vis.gateway_url}/v1/messages", timeout=60, headers={"x-api-key": vis.admin_api_key}, json={
        "model": "llava", "max_tokens": 4, "system": "Be brief.", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look."}, {"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": broken.split(",")[1]}}]}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "messages[0].content[1].source" in error["message"] and "messages[1]" not in error["message"], error


def test_a_file_url_from_an_allowed_folder(vis, own, folder, tmp_path):
    image = png(32, 32, seed=7)
    (folder / "cat.png").write_bytes(image)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look."},
                                             {"type": "image_url", "image_url": {"url": f"file://{folder}/cat.png"}}]}]
    got = oai(vis).chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == own(asking("Look.", image), 8)[1]
    (tmp_path / "dog.png").write_bytes(image)  # outside image_folders
    messages[0]["content"][1]["image_url"]["url"] = f"file://{tmp_path}/dog.png"
    r = post(vis, {"model": "llava", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1].image_url"


def post(m, body: dict) -> requests.Response:
    return requests.post(f"{m.gateway_url}/v1/chat/completions", json={"max_tokens": 4, **body},
                         headers={"Authorization": f"Bearer {m.admin_api_key}"}, timeout=60)


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = png(16, 16)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_bad_images_and_blocked_urls_are_a_400_naming_the_part_and_the_instance_keeps_serving(vis, own):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    loopback = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    part = "messages[0].content[1]"

    def with_url(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": "Look."},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    try:
        for messages, field, words in (
                (with_url(data_uri(b"just some text", "text/plain")), f"{part}.image_url", "not an image"),
                (with_url(data_uri(b"\x89PNG\r\n\x1a\n" + bytes(40))), f"{part}.image_url", "not an image"),
                (with_url(data_uri(png(16, 16)[:-30])), f"{part}.image_url", "broken image"),
                (with_url(data_uri(png(100, 50))), f"{part}.image_url", "max_image_pixels"),
                (with_url("data:image/png;base64,not base64!"), f"{part}.image_url", "base64"),
                (with_url(loopback), f"{part}.image_url", "not a public address"),
                (with_url("ftp://example.com/cat.png"), f"{part}.image_url", "'ftp' URLs"),
                (asking("Many.", *[png(8, 8, seed=i) for i in range(MAX_IMAGES + 1)]),
                 f"messages[0].content[{MAX_IMAGES + 1}]", "max_images"),
                ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
                 "messages[0].content[0]", "image_url parts")):
            r = post(vis, {"model": "llava", "messages": messages})
            assert r.status_code == 400, (field, r.text)
            assert r.json()["error"]["param"] == field, r.text
            assert words in r.json()["error"]["message"], r.text
        # a model without the vision ability: named as well
        r = post(vis, {"model": "hf", "messages": asking("Look.", png(8, 8))})
        assert r.status_code == 400 and r.json()["error"]["param"] == part
        assert "no 'vision' ability" in r.json()["error"]["message"]
    finally:
        server.shutdown()
    # past the edge's checks (the client's own settings allow 4096 x 4096), the instance holds its own limits
    with pytest.raises(InvalidRequest, match="max_image_pixels") as refusal:
        vis.client.get_model("llava").chat(messages=asking("Look.", png(100, 50)))
    assert refusal.value.field == part
    messages = asking("Still there?", png(16, 16, seed=9))
    got = oai(vis).chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == own(messages, 8)[1]


def test_registration_from_the_folder_says_vision(tiny_models):
    kind, definition = registration_from_path(str(tiny_models["llava"]))
    assert kind == "LLM" and definition["model_family"] == "other"
    assert {"chat", "vision"} <= set(definition["model_ability"])
    assert definition["architectures"] == ["LlavaForConditionalGeneration"]


# ------------------------------------------------------------------ llama.cpp: the GGUF LLaVA and its mmproj file

def gguf_vision_definition(folder) -> dict:
    return {"version": 2, "model_name": "my-llava-gguf", "model_family": "other", "model_lang": ["en"],
            "model_ability": ["chat", "vision"], "context_length": 2048,
            "model_specs": [{"model_format": "ggufv2", "model_size_in_billions": 1, "quantization": "F32",
                             "model_uri": f"file://{folder}", "model_file_name_template": GGUF_TEMPLATE,
                             "multimodal_projectors": [MMPROJ]}]}


@pytest.fixture(scope="module")
def vis_gguf(vis, tiny_models):
    vis.client.register_model("LLM", json.dumps(gguf_vision_definition(tiny_models["llava_gguf_dir"])))
    vis.client.launch_model(model_name="my-llava-gguf", model_uid="llava-gguf", model_format="ggufv2",
                            quantization="F32", model_engine="llama.cpp")
    return vis


@pytest.fixture(scope="module")
def raw_llama(tiny_models):
    """llama-cpp-python's own multimodal chat on the same two files, in this process (tinyvision.llama_cpp_chat).
    Gives (prompt tokens, the answer's tokens' texts, its text): create_completion goes past max_tokens while the
    last token ends inside a UTF-8 character, so answers are compared token by token up to the served count."""
    llm = llama_cpp_chat(tiny_models["llava_gguf_dir"], GGUF_TEMPLATE.replace("{quantization}", "F32"), MMPROJ,
                         logits_all=True)
    lock = threading.Lock()

    def run(messages: list[dict], max_tokens: int = 12) -> tuple[int, list[str], str]:
        with lock:
            out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0,
                                             repeat_penalty=1.0, logprobs=True, top_logprobs=1)
        tokens = [t["token"] for t in out["choices"][0]["logprobs"]["content"]]
        return out["usage"]["prompt_tokens"], tokens, out["choices"][0]["message"]["content"] or ""

    yield run
    llm.close()


def same_answer(tokens: list[str], text: str, raw: tuple[int, list[str], str]) -> bool:
    """A served answer (its tokens' texts, its text) is llama-cpp-python's, token for token."""
    return bool(tokens) and tokens == raw[1][:len(tokens)] and bool(text) and raw[2].startswith(text)


def served(m, model: str, messages: list[dict], max_tokens: int = 12) -> tuple[list[str], str, int]:
    """(the answer's tokens' texts, its text, its prompt's tokens) through the openai SDK."""
    out = oai(m).chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                         logprobs=True)
    choice = out.choices[0]
    return [t.token for t in choice.logprobs.content], choice.message.content, out.usage.prompt_tokens


def test_llama_cpp_sees_images_through_the_mmproj_file_as_llama_cpp_python_does(vis_gguf, raw_llama):
    messages = asking("What is in this picture?", png(32, 32, seed=1))
    tokens, text, n = served(vis_gguf, "llava-gguf", messages)
    raw = raw_llama(messages)
    assert same_answer(tokens, text, raw) and len(tokens) == 12
    assert n == raw[0]
    three = vis_gguf.client.get_model("llava-gguf").chat(  # choices after the first copy its cache, image and all
        messages=messages, generate_config={"max_tokens": 12, "temperature": 0, "n": 3})
    assert [c["message"]["content"] for c in three["choices"]] == [text] * 3
    plain = served(vis_gguf, "llava-gguf", [{"role": "user", "content": "What is in this picture?"}])
    assert n == plain[2] + IMAGE_TOKENS  # the marker's place became the image's tokens
    other = asking("What is in this picture?", png(32, 32, seed=2))
    assert raw_llama(other)[2] != raw[2]  # what it says depends on the image
    assert same_answer(*served(vis_gguf, "llava-gguf", other)[:2], raw_llama(other))


def test_llama_cpp_batches_chats_with_images_and_text_only_ones(vis_gguf, raw_llama):
    """Two images in one message (a WebP one, which llama.cpp's own decoder lacks), streamed; then six chats at
    once, three with an image, prefilled and decoded together in the instance."""
    from PIL import Image

    webp = io.BytesIO()
    Image.open(io.BytesIO(png(24, 24, seed=5))).save(webp, format="WEBP", lossless=True)
    two = asking("Compare these.", png(32, 32, seed=3), webp.getvalue())
    chunks = list(oai(vis_gguf).chat.completions.create(model="llava-gguf", messages=two, max_tokens=12,
                                                        temperature=0, stream=True, logprobs=True))
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    lossless = asking("Compare these.", png(32, 32, seed=3), png(24, 24, seed=5))
    assert same_answer(tokens, text, raw_llama(lossless))  # the WebP's pixels are the PNG's
    chats = [asking(f"Picture {i}?", png(32, 32, seed=10 + i)) if i % 2 else
             [{"role": "user", "content": f"Say something about {i}."}] for i in range(6)]

    def ask(messages):
        out = vis_gguf.client.get_model("llava-gguf").chat(
            messages=messages, generate_config={"max_tokens": 12, "temperature": 0, "logprobs": True})
        choice = out["choices"][0]
        return [t["token"] for t in choice["logprobs"]["content"]], choice["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, chats))
    for (tokens, text), messages in zip(got, chats, strict=True):
        assert same_answer(tokens, text, raw_llama(messages)), messages


def test_projector_choices_are_checked_by_name(vis_gguf, tiny_models, tmp_path):
    client = vis_gguf.client
    with pytest.raises(InvalidRequest, match="not one of the spec's multimodal_projectors") as refusal:
        client.launch_model(model_name="my-llava-gguf", model_uid="llava-x", model_format="ggufv2",
                            quantization="F32", multimodal_projector="mmproj-other.gguf")
    assert refusal.value.field == "multimodal_projector"
    with pytest.raises(InvalidRequest, match="multimodal_projector is an option of the llama.cpp engine"):
        client.launch_model(model_name="my-llava", model_uid="llava-y", model_format="pytorch",
                            multimodal_projector=MMPROJ)
    missing = gguf_vision_definition(tiny_models["llava_gguf_dir"])
    missing["model_name"], missing["model_specs"][0]["multimodal_projectors"] = "no-mmproj", ["mmproj-gone.gguf"]
    with pytest.raises(InvalidRequest, match="mmproj-gone.gguf is not in") as refusal:
        client.register_model("LLM", json.dumps(missing))
    assert refusal.value.field == "model_specs[0].multimodal_projectors"
    assert "no-mmproj" not in [r["model_name"] for r in client.list_model_registrations("LLM")]
    # an mmproj that is not one (the model file itself) is refused by name when the instance loads it
    text_only = gguf_vision_definition(tiny_models["llava_gguf_dir"])
    text_only["model_name"] = "llava-wrong-mmproj"
    text_only["model_specs"][0]["multimodal_projectors"] = [GGUF_TEMPLATE.replace("{quantization}", "F32")]
    client.register_model("LLM", json.dumps(text_only))
    with pytest.raises(InvalidRequest, match="not a multimodal projector") as refusal:
        client.launch_model(model_name="llava-wrong-mmproj", model_uid="llava-z", model_format="ggufv2",
                            quantization="F32")
    assert refusal.value.field == "multimodal_projector"
    # the registration gives its projectors back; one that lists none chats in text and refuses images by name
    blind = gguf_vision_definition(tiny_models["llava_gguf_dir"])
    blind["model_name"] = "llava-blind"
    del blind["model_specs"][0]["multimodal_projectors"]
    client.register_model("LLM", json.dumps(blind))
    client.launch_model(model_name="llava-blind", model_uid="llava-blind", model_format="ggufv2", quantization="F32")
    try:
        got = client.get_model("llava-blind").chat(messages=[{"role": "user", "content": "Hi"}],
                                                   generate_config={"max_tokens": 4, "temperature": 0})
        assert got["usage"]["completion_tokens"] >= 1
        r = post(vis_gguf, {"model": "llava-blind", "messages": asking("Look.", png(8, 8))})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1]"
        assert "without a multimodal projector" in r.json()["error"]["message"]
    finally:
        client.terminate_model("llava-blind")
    assert client.get_model_registration("LLM", "my-llava-gguf")["model_specs"][0]["multimodal_projectors"] == [MMPROJ]


def test_registration_from_the_gguf_file_finds_its_projector(tiny_models):
    folder = tiny_models["llava_gguf_dir"]
    kind, definition = registration_from_path(str(folder / GGUF_TEMPLATE.replace("{quantization}", "F32")))
    assert kind == "LLM" and {"chat", "vision"} <= set(definition["model_ability"])
    assert definition["model_specs"][0]["multimodal_projectors"] == [MMPROJ]
    with pytest.raises(InvalidRequest, match="is a multimodal projector") as refusal:
        registration_from_path(str(folder / MMPROJ))
    assert refusal.value.field == "model_path"
