"""The web UI in a real browser: Debian's headless Chromium driven by Playwright against a real gateway and mesh.
Screenshots of each page go to ZINFER_UI_SHOTS (default: the test's own temporary folder), not to git."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.conftest import llm_definition, served_mesh
from tests.test_vision import vision_definition
from zinfer.services.gateway import ui
from zinfer.shared import keys, tinytools

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
XSS = "<img src=x onerror=alert(1)>"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup installs it as root)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "ui", ["emb", "hf-long", "rr"], gateway=True) as m:
        m.client.register_model("LLM", llm_definition(tiny_models, "xss-model", model_description=XSS))
        m.client.register_model("LLM", tinytools.registration("tool-llama", tiny_models["tools_pytorch"]))
        m.client.launch_model(model_name="tool-llama", model_uid="tools", model_format="pytorch")
        m.client.register_model("audio", {"version": 2, "model_name": "my-whisper", "model_family": "whisper",
                                          "model_ability": ["audio2text"], "multilingual": True,
                                          "model_uri": f"file://{tiny_models['whisper']}"})
        m.client.launch_model(model_name="my-whisper", model_type="audio", model_uid="whisper")
        m.client.register_model("audio", {"version": 2, "model_name": "my-vits", "model_family": "vits",
                                          "model_ability": ["text2audio"], "model_uri": f"file://{tiny_models['vits']}"})
        m.client.launch_model(model_name="my-vits", model_type="audio", model_uid="vits")
        m.client.register_model("LLM", vision_definition(tiny_models["llava"]))
        m.client.launch_model(model_name="my-llava", model_uid="llava", model_format="pytorch")
        m.user_api_key = keys.api_key_of(keys.read_key_file(m.user_key))
        yield m


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ZINFER_UI_SHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # No background networking: this machine's closed network refuses Chromium's own connections.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            # a fake microphone (a beep) that needs no permission prompt: the transcribe playground records it
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.dialogs = []  # every alert/confirm the page raised
    pg.on("dialog", lambda d: (pg.dialogs.append((d.type, d.message)), d.accept()))
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    # Script errors only: the browser also logs every 4xx answer (a refused key, a bad field) as a console error.
    pg.on("console", lambda msg: pg.errors.append(msg.text)
          if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    yield pg
    context.close()


def send_greedy(page, message: str):
    """Send one chat message from the playground, greedy and 12 tokens at most; the answered turn."""
    from playwright.sync_api import expect

    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message").fill(message)
    page.get_by_role("button", name="Send").click()
    turn = page.locator(".turn.assistant[data-done]")
    expect(turn).to_have_count(1, timeout=60_000)
    return turn


def sign_in(page, site, key: str) -> None:
    from playwright.sync_api import expect

    page.goto(site.gateway_url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Running models")).to_be_visible()


def test_the_ui_is_served_with_a_policy_that_forbids_inline_scripts(site):
    r = requests.get(site.gateway_url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "<script" in r.text and not re.search(r"<script(?![^>]*\bsrc=)", r.text)  # no inline script
    js = requests.get(site.gateway_url + "/ui/app.js", timeout=10)
    assert js.headers["content-type"].startswith("text/javascript") and "innerHTML" not in js.text
    assert requests.get(site.gateway_url + "/ui/..%2Fapp.py", timeout=10).status_code == 404


def test_missing_files_say_so_instead_of_a_blank_page(tmp_path):
    files = ui.load_files(tmp_path / "nothing-here")
    response = ui.asset(files, "index.html")
    assert response.status_code == 500 and b"not in this install" in response.body
    assert response.headers["content-security-policy"] == ui.CSP


def test_whoami_names_the_key_and_its_role(site):
    for key, role in ((site.admin_api_key, "admin"), (site.user_api_key, "user")):
        r = requests.get(site.gateway_url + "/v1/whoami", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.json() == {"name": role, "role": role}
    assert requests.get(site.gateway_url + "/v1/whoami", timeout=10).status_code == 401


def test_a_user_key_sees_models_and_no_admin_buttons(page, site, shots):
    from playwright.sync_api import expect

    page.goto(site.gateway_url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("navigation")).to_be_hidden()  # nothing but the sign-in before a key
    page.screenshot(path=shots / "signin.png")
    page.get_by_label("API key").fill("zk-" + "0" * 64)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    sign_in(page, site, site.user_api_key)
    row = page.locator("tr[data-uid='emb']")
    expect(row).to_contain_text("ready")
    expect(row).to_contain_text("custom-bge-base-en")
    expect(page.get_by_text("user (user)")).to_be_visible()
    assert page.get_by_role("button", name="Terminate emb").count() == 0
    page.screenshot(path=shots / "instances-user.png", full_page=True)

    page.get_by_role("link", name="Cluster").click()
    expect(page.locator("tr[data-worker='cpu']")).to_contain_text("cpu")
    page.screenshot(path=shots / "cluster.png", full_page=True)

    page.get_by_role("link", name="Models", exact=True).click()
    expect(page.get_by_role("link", name="custom-llama-2")).to_be_visible()
    page.screenshot(path=shots / "models.png", full_page=True)
    page.get_by_label("Search").fill("xss")
    expect(page.get_by_role("link", name="custom-llama-2")).to_have_count(0)
    page.get_by_role("link", name="xss-model").click()
    expect(page.locator("#description")).to_have_text(XSS)  # shown as text
    assert page.locator("#description img").count() == 0 and page.get_by_role("button", name="Unregister").count() == 0
    expect(page.locator("#definition-json")).to_contain_text('"model_name": "xss-model"')
    page.screenshot(path=shots / "registration.png", full_page=True)
    assert page.dialogs == [] and page.errors == []  # the description ran nothing

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0 and page.context.cookies() == []


def test_an_admin_terminates_from_the_list(page, site, shots):
    from playwright.sync_api import expect

    site.client.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb2")
    sign_in(page, site, site.admin_api_key)
    expect(page.locator("tr[data-uid='emb2']")).to_contain_text("ready")
    page.screenshot(path=shots / "instances-admin.png", full_page=True)
    page.get_by_role("button", name="Terminate emb2").click()
    expect(page.locator("tr[data-uid='emb2']")).to_have_count(0)
    assert ("confirm", "Terminate emb2?") in page.dialogs
    assert "emb2" not in site.client.list_models() and page.errors == []


def test_the_pages_fit_a_phone_screen(browser, site, shots):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    pg = context.new_page()
    sign_in(pg, site, site.user_api_key)
    expect(pg.locator("tr[data-uid='emb']")).to_contain_text("ready")
    for name, url in (("instances", "#/instances"), ("playground", "#/playground?model=hf-long"),
                      ("models", "#/models")):
        pg.goto(f"{site.gateway_url}/{url}")
        expect(pg.locator("main h1")).to_be_visible()
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{name}: the page is {width}px wide on a 390px screen"  # tables scroll in their box
        pg.screenshot(path=shots / f"{name}-phone.png", full_page=True)
    context.close()


def test_an_admin_registers_edits_launches_tries_and_removes_a_model(page, site, shots, tiny_models):
    """The seed documents' custom LLM, from the form to a chat and back: a bad field first (its error beside it),
    then fixed; edited; launched with its progress; a streamed chat, and one stopped mid-way (the worker cancels
    it); two texts embedded; terminated; unregistered."""
    from playwright.sync_api import expect

    sign_in(page, site, site.admin_api_key)
    page.get_by_role("link", name="Models", exact=True).click()
    page.get_by_role("link", name="Register a model").click()
    expect(page.get_by_role("heading", name="Register a custom LLM")).to_be_visible()
    page.get_by_label("Model name").fill("bad name!")
    page.get_by_label("Description").fill("The seed documents' custom-llama-2, registered from the web UI.")
    page.get_by_label("Prompt style").select_option("CHATML")
    page.locator("#spec-0-size").fill("1")
    page.locator("#spec-0-quantizations").fill("4-bit, 8-bit, none")
    page.locator("#spec-0-model_id").fill("zinfer/tiny-llama")
    page.locator("#spec-0-model_uri").fill(f"file://{tiny_models['pytorch']}")
    page.get_by_role("button", name="Add a spec").click()
    page.locator("#spec-1-format").select_option("ggufv2")
    page.locator("#spec-1-size").fill("1")
    page.locator("#spec-1-quantizations").fill("F32, F16")
    page.locator("#spec-1-model_uri").fill(f"file://{tiny_models['gguf_dir']}")
    page.locator("#spec-1-template").fill("tiny-llama.{quantization}.gguf")
    expect(page.locator("#definition-json")).to_have_value(re.compile(r'"model_file_name_template": "tiny-llama'))
    page.get_by_role("button", name="Register", exact=True).click()
    expect(page.locator("[data-error-for='model_name']")).to_contain_text("must start with a letter")  # by its field
    expect(page.get_by_label("Model name")).to_have_attribute("aria-invalid", "true")
    page.screenshot(path=shots / "register-error.png", full_page=True)
    page.get_by_label("Model name").fill("ui-llama")
    page.get_by_role("button", name="Register", exact=True).click()
    expect(page.get_by_role("heading", name="ui-llama")).to_be_visible()
    expect(page.locator("#description")).to_contain_text("registered from the web UI")

    page.get_by_role("link", name="Edit").click()
    expect(page.get_by_label("Model name")).to_have_value("ui-llama")
    page.get_by_label("Description").fill("Edited in place.")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#description")).to_have_text("Edited in place.")
    assert len([r for r in site.client.list_model_registrations("LLM") if r["model_name"] == "ui-llama"]) == 1
    page.screenshot(path=shots / "registration-admin.png", full_page=True)

    page.get_by_role("link", name="Launch").click()
    page.get_by_label("Quantization").select_option("none")
    expect(page.locator("#launch-command")).to_contain_text("zinfer launch --model-name ui-llama --model-type LLM "
                                                            "--model-format pytorch --size-in-billions 1 "
                                                            "--quantization none --model-uid ui-llama")
    page.get_by_role("button", name="Launch", exact=True).click()
    expect(page.locator("#launch-state")).to_contain_text("ready", timeout=120_000)
    page.screenshot(path=shots / "launch.png", full_page=True)

    page.get_by_role("link", name="Try ui-llama").click()
    turn = send_greedy(page, "Hello!")
    reply = site.client.get_model("ui-llama").chat([{"role": "user", "content": "Hello!"}],
                                                    {"temperature": 0, "max_tokens": 12})
    expect(turn.locator(".answer")).to_have_text(reply["choices"][0]["message"]["content"])  # as the client got it
    page.screenshot(path=shots / "chat.png", full_page=True)

    cancelled = site.client.describe_model("hf-long")["stats"]["cancelled"]
    page.get_by_label("Model").select_option("hf-long")
    page.get_by_label("Max tokens").fill("6000")
    page.get_by_role("button", name="Clear the history").click()
    page.get_by_label("Message").fill("Tell me a long story.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".turn.assistant .answer")).not_to_be_empty(timeout=60_000)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".turn.assistant .note")).to_have_text("(stopped)")
    site.wait(lambda: site.client.describe_model("hf-long")["stats"]["cancelled"] > cancelled or None, timeout=30)

    page.get_by_role("link", name="Embeddings").click()
    page.get_by_label("Model").select_option("emb")
    page.get_by_label("First text").fill("The blue whale is the largest animal.")
    page.get_by_label("Second text").fill("Whales are the biggest animals on Earth.")
    page.get_by_role("button", name="Embed").click()
    expect(page.locator("#embed-dimensions")).to_have_text("384")
    similarity = float(page.locator("#embed-similarity").text_content())
    assert 0.5 < similarity <= 1.0, similarity
    page.screenshot(path=shots / "embeddings.png", full_page=True)

    page.get_by_role("link", name="Running models").click()
    page.get_by_role("button", name="Terminate ui-llama").click()
    expect(page.locator("tr[data-uid='ui-llama']")).to_have_count(0)
    page.goto(site.gateway_url + "/#/models/LLM/ui-llama")
    page.get_by_role("button", name="Unregister").click()
    expect(page.get_by_role("heading", name="Models")).to_be_visible()
    assert "ui-llama" not in {r["model_name"] for r in site.client.list_model_registrations("LLM")}
    assert page.errors == [], page.errors


def test_rerank_registrations_and_the_rerank_playground(page, site, shots):
    from playwright.sync_api import expect

    sign_in(page, site, site.user_api_key)
    page.goto(site.gateway_url + "/#/models?type=rerank")
    expect(page.get_by_role("link", name="custom-reranker")).to_be_visible()
    expect(page.get_by_role("link", name="bge-reranker-base")).to_be_visible()
    page.get_by_role("link", name="custom-reranker").click()
    expect(page.locator(".facts")).to_contain_text("normal")
    page.screenshot(path=shots / "registration-rerank.png", full_page=True)
    documents = ["Foxes jump over lazy dogs.", "The blue whale is the largest animal.", "Octopuses have three hearts."]
    page.goto(site.gateway_url + "/#/playground?tab=rerank&model=rr")
    page.get_by_label("Query").fill("What is the largest animal?")
    page.get_by_label("Documents").fill("\n".join(documents))
    page.get_by_label("Top n").fill("2")
    page.get_by_role("button", name="Rerank").click()
    rows = page.locator("#rerank-result tbody tr")
    expect(rows).to_have_count(2)
    expected = site.client.get_model("rr").rerank(documents, "What is the largest animal?", top_n=2)["results"]
    for i, want in enumerate(expected):
        cells = rows.nth(i).locator("td")
        expect(cells.nth(1)).to_have_text(f"{want['relevance_score']:.6f}")
        expect(cells.nth(3)).to_have_text(documents[want["index"]])
    page.screenshot(path=shots / "playground-rerank.png", full_page=True)
    assert page.errors == [], page.errors


def test_audio_registrations_and_the_transcribe_playground(page, site, shots, tmp_path):
    """An audio file chosen in the Transcribe tab plays in its player and comes back as the subtitles the API gives
    for it."""
    from playwright.sync_api import expect

    from zinfer.shared.tinyaudio import tone_wav

    sign_in(page, site, site.user_api_key)
    page.goto(site.gateway_url + "/#/models?type=audio")
    expect(page.get_by_role("link", name="my-whisper", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="whisper-large-v3", exact=True)).to_be_visible()
    page.get_by_role("link", name="my-whisper", exact=True).click()
    expect(page.locator(".facts")).to_contain_text("audio2text")
    wav = tone_wav(3, seed=7)
    (tmp_path / "speech.wav").write_bytes(wav)
    page.goto(site.gateway_url + "/#/playground?model=whisper")
    expect(page.locator("#transcribe-model")).to_have_value("whisper")  # the tab a speech model opens on
    page.locator("#transcribe-file").set_input_files(str(tmp_path / "speech.wav"))
    expect(page.locator("#transcribe-player")).to_be_visible()
    page.locator("#transcribe-format").select_option("srt")
    page.get_by_role("button", name="Transcribe").click()
    want = site.client.get_model("whisper").transcriptions(wav, response_format="srt")
    expect(page.locator("#transcribe-result")).to_have_text(want)
    page.screenshot(path=shots / "playground-transcribe.png", full_page=True)
    page.locator("#transcribe-file").set_input_files({"name": "x.wav", "mimeType": "audio/wav",
                                                      "buffer": b"not audio"})
    page.get_by_role("button", name="Transcribe").click()
    expect(page.locator("#playground-panel .error")).to_contain_text("not audio")
    page.goto(site.gateway_url + "/#/playground?model=vits")  # text to speech: the Speak tab
    page.get_by_label("Text").fill("hello from the playground")
    page.get_by_role("button", name="Speak").click()
    want = site.client.get_model("vits").speech("hello from the playground", response_format="wav")
    expect(page.locator("#speak-player")).to_have_attribute("data-bytes", str(len(want)))
    expect(page.locator("#speak-download")).to_have_attribute("download", "speech.wav")
    page.screenshot(path=shots / "playground-speak.png", full_page=True)
    assert page.errors == [], page.errors


def test_the_transcribe_playground_records_the_microphone(page, site, shots):
    """Record (Chromium's fake microphone), Stop: the recording plays, and Transcribe gives the API's text for the
    same WAV bytes."""
    from playwright.sync_api import expect

    sign_in(page, site, site.user_api_key)
    page.goto(site.gateway_url + "/#/playground?model=whisper")
    page.locator("#transcribe-record").click()
    expect(page.locator("#transcribe-record")).to_have_attribute("data-seconds", re.compile(r"^[1-9]\d*(\.\d+)?$"),
                                                                 timeout=30_000)  # a second or more recorded
    page.locator("#transcribe-record").click()
    expect(page.locator("#transcribe-player")).to_be_visible()
    expect(page.locator("#transcribe-record")).to_have_text("Record")
    recorded = bytes(page.locator("#transcribe-player").evaluate(
        "async (player) => Array.from(new Uint8Array(await player.audio.arrayBuffer()))"))  # what Transcribe sends
    assert recorded[:4] == b"RIFF" and recorded[8:12] == b"WAVE" and len(recorded) > 44 + 2 * 8000
    page.locator("#transcribe-format").select_option("text")
    page.get_by_role("button", name="Transcribe").click()
    want = site.client.get_model("whisper").transcriptions(recorded, response_format="text")
    expect(page.locator("#transcribe-result")).to_have_text(want)
    page.screenshot(path=shots / "playground-record.png", full_page=True)
    assert page.errors == [], page.errors


def test_the_prompt_styles_page_lists_every_style(page, site, shots):
    from playwright.sync_api import expect

    sign_in(page, site, site.user_api_key)
    page.goto(site.gateway_url + "/#/prompt-styles")
    for name in ("LLAMA2", "CHATML", "QWEN"):
        expect(page.locator(f"#style-{name}")).to_contain_text('"style_name"')
    page.screenshot(path=shots / "prompt-styles.png", full_page=True)


def test_a_user_key_cannot_do_what_the_admin_buttons_do(site):
    user = {"Authorization": f"Bearer {site.user_api_key}"}
    launch = requests.post(site.gateway_url + "/v1/models", json={"model_name": "custom-bge-base-en",
                                                                  "model_type": "embedding"}, headers=user, timeout=30)
    terminate = requests.delete(site.gateway_url + "/v1/models/emb", headers=user, timeout=30)
    unregister = requests.delete(site.gateway_url + "/v1/model_registrations/LLM/xss-model", headers=user, timeout=30)
    assert [r.status_code for r in (launch, terminate, unregister)] == [403, 403, 403]
    assert "emb" in site.client.list_models()


def test_a_definition_loaded_from_a_file_fills_the_form(page, site, tiny_models, tmp_path):
    import json

    from playwright.sync_api import expect

    from tests.conftest import embedding_definition

    definition = tmp_path / "from-file.json"
    definition.write_text(json.dumps(embedding_definition(tiny_models, "from-file")))
    sign_in(page, site, site.admin_api_key)
    page.goto(site.gateway_url + "/#/register?type=embedding")
    page.locator("#definition-file").set_input_files(str(definition))
    expect(page.get_by_label("Model name")).to_have_value("from-file")
    expect(page.get_by_label("Dimensions")).to_have_value("384")
    page.get_by_role("button", name="Register", exact=True).click()
    expect(page.get_by_role("heading", name="from-file")).to_be_visible()
    assert site.client.get_model_registration("embedding", "from-file")["dimensions"] == 384
    site.client.unregister_model("embedding", "from-file")


def test_the_register_page_fills_the_form_from_a_path(page, site, tiny_models, shots):
    from playwright.sync_api import expect

    from zinfer.shared.fromfiles import registration_from_path

    sign_in(page, site, site.admin_api_key)
    page.goto(site.gateway_url + "/#/register?type=LLM")
    page.get_by_label("A model folder or .gguf file").fill(str(tiny_models["tools_pytorch"]))
    page.get_by_role("button", name="Fill in", exact=True).click()
    _, expected = registration_from_path(str(tiny_models["tools_pytorch"]))
    expect(page.get_by_label("Model name")).to_have_value("tool-llama")
    expect(page.get_by_label("Context length")).to_have_value(str(expected["context_length"]))
    checked = page.locator("input[name=ability]:checked").evaluate_all("boxes => boxes.map(b => b.value)")
    assert sorted(checked) == sorted(expected["model_ability"]) and "tools" in checked
    expect(page.locator("#spec-0-model_uri")).to_have_value(f"file://{tiny_models['tools_pytorch']}")
    page.screenshot(path=shots / "register-filled.png", full_page=True)
    # A GGUF vision model: its mmproj file beside it fills the spec's projectors, and vision is checked
    page.get_by_label("A model folder or .gguf file").fill(str(tiny_models["llava_gguf_dir"] / "tiny-llava.F32.gguf"))
    page.get_by_role("button", name="Fill in", exact=True).click()
    expect(page.locator("#spec-0-projectors")).to_have_value("mmproj-tiny-llava-f32.gguf")
    expect(page.locator("input[name=ability][value=vision]")).to_be_checked()
    assert '"multimodal_projectors"' in page.locator("#definition-json").input_value()
    page.screenshot(path=shots / "register-filled-vision.png", full_page=True)
    # An embedding folder switches the page to the embedding form, filled
    page.get_by_label("A model folder or .gguf file").fill(str(tiny_models["embedder"]))
    page.get_by_role("button", name="Fill in", exact=True).click()
    expect(page.get_by_label("Dimensions")).to_have_value("64")
    page.get_by_label("Model name").fill("filled-embedder")
    page.get_by_role("button", name="Register", exact=True).click()
    expect(page.get_by_role("heading", name="filled-embedder")).to_be_visible()
    assert site.client.get_model_registration("embedding", "filled-embedder")["dimensions"] == 64
    site.client.unregister_model("embedding", "filled-embedder")
    # A path with no model: the error beside the box, nothing filled
    page.goto(site.gateway_url + "/#/register?type=LLM")
    page.get_by_label("A model folder or .gguf file").fill("/nonexistent/model")
    page.get_by_role("button", name="Fill in", exact=True).click()
    expect(page.locator("#fill-source-error")).to_contain_text("does not exist")
    assert not page.errors, page.errors


def test_running_models_show_the_path_a_model_was_launched_from(page, site, tiny_models, shots):
    from playwright.sync_api import expect

    path = str(tiny_models["embedding"])
    site.client.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_path=path,
                             model_uid="by-path")
    try:
        sign_in(page, site, site.admin_api_key)
        row = page.locator('tr[data-uid="by-path"]')
        expect(row.locator(".model-path")).to_have_text(f"from {path}")
        page.screenshot(path=shots / "running-by-path.png", full_page=True)
    finally:
        site.client.terminate_model("by-path")


def test_filling_from_files_needs_an_admin_key(site, tiny_models):
    url = site.gateway_url + "/v1/registration_from_files"
    body = {"model_path": str(tiny_models["embedding"])}
    user = requests.post(url, json=body, headers={"Authorization": f"Bearer {site.user_api_key}"}, timeout=30)
    assert user.status_code == 403
    admin = requests.post(url, json=body, headers={"Authorization": f"Bearer {site.admin_api_key}"}, timeout=30)
    assert admin.status_code == 200 and admin.json()["model_type"] == "embedding"
    both = requests.post(url, json={**body, "model_id": "x/y"}, timeout=30,
                         headers={"Authorization": f"Bearer {site.admin_api_key}"})
    assert both.status_code == 400 and "model_path" in both.text


def test_the_chat_playground_shows_reasoning_and_tool_calls(page, site, shots):
    import json

    from playwright.sync_api import expect

    sign_in(page, site, site.admin_api_key)
    page.goto(site.gateway_url + "/#/playground?model=tools")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("60")
    page.get_by_label("Message").fill(tinytools.THINK_Q)
    page.get_by_role("button", name="Send").click()
    turn = page.locator(".turn.assistant[data-done]")
    expect(turn).to_have_count(1, timeout=60_000)
    expect(turn.locator(".reasoning-text")).to_have_text(tinytools.THINK_R)
    expect(turn.locator(".answer")).to_have_text(tinytools.THINK_A)
    turn.locator(".reasoning summary").click()  # collapsible: open it again to show it
    page.screenshot(path=shots / "chat-reasoning.png", full_page=True)

    page.get_by_role("button", name="Clear the history").click()
    page.locator("summary", has_text="Tools and thinking").click()
    page.get_by_label("Tools (JSON)").fill(json.dumps(tinytools.TOOLS))
    page.get_by_label("Message").fill(tinytools.WEATHER_Q)
    page.get_by_role("button", name="Send").click()
    expect(turn).to_have_count(1, timeout=60_000)
    expect(turn.locator(".tool-name")).to_have_text("Tool call: get_weather")
    assert json.loads(turn.locator(".tool-call pre").text_content()) == {"city": "Paris"}
    expect(turn.locator(".answer")).to_be_empty()
    page.screenshot(path=shots / "chat-tool-call.png", full_page=True)

    page.get_by_label("Tools (JSON)").fill("[{not json")
    page.get_by_label("Message").fill("again")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("alert")).to_contain_text("Tools: not valid JSON")
    assert page.errors == [], page.errors


def test_the_chat_playground_sends_images_to_a_model_that_sees_them(page, site, shots, tmp_path):
    """Images picked in the chat playground show as thumbnails, go as image_url parts (data URIs), and the answer is
    the API's for the same message and image; a model without the vision ability offers no picker."""
    import base64

    from playwright.sync_api import expect

    from zinfer.shared.tinyvision import png

    image = png(48, 32, seed=5)
    (tmp_path / "cat.png").write_bytes(image)
    sign_in(page, site, site.user_api_key)
    page.goto(site.gateway_url + "/#/playground?model=hf-long")
    expect(page.locator("#chat-images")).to_be_hidden()  # no vision ability
    page.goto(site.gateway_url + "/#/playground?model=llava")
    page.locator("#chat-images").set_input_files(str(tmp_path / "cat.png"))
    expect(page.locator("#chat-image-previews img")).to_have_count(1)
    turn = send_greedy(page, "What is this?")
    expect(page.locator(".turn.user .image-previews img")).to_have_count(1)
    expect(page.locator("#chat-image-previews img")).to_have_count(0)  # sent: the picker is empty again
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    want = site.client.get_model("llava").chat(
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               {"type": "image_url", "image_url": {"url": url}}]}],
        generate_config={"max_tokens": 12, "temperature": 0})["choices"][0]["message"]["content"]
    expect(turn.locator(".answer")).to_have_text(want)
    page.screenshot(path=shots / "chat-image.png", full_page=True)
    assert page.errors == [], page.errors


def test_lora_adapters_show_on_the_running_list_and_in_the_playground_menu(page, site, tiny_models, shots):
    from playwright.sync_api import expect

    site.client.load_lora("hf-long", "ui-lora", str(tiny_models["lora_a"]))
    try:
        sign_in(page, site, site.admin_api_key)
        expect(page.locator('tr[data-uid="hf-long"] .loras')).to_have_text("LoRA: ui-lora")
        expect(page.locator('tr[data-uid="ui-lora"]')).to_have_count(0)  # an adapter is no running model
        page.screenshot(path=shots / "running-lora.png", full_page=True)
        page.goto(site.gateway_url + "/#/playground?tab=chat&model=ui-lora")
        expect(page.get_by_label("Model")).to_have_value("ui-lora")
        expect(page.locator('option[value="ui-lora"]')).to_have_text("ui-lora (LoRA of hf-long)")
        turn = send_greedy(page, "Hello!")
        reply = site.client.get_model("hf-long").chat([{"role": "user", "content": "Hello!"}],
                                                      {"temperature": 0, "max_tokens": 12, "lora_name": "ui-lora"})
        expect(turn.locator(".answer")).to_have_text(reply["choices"][0]["message"]["content"])
        page.screenshot(path=shots / "chat-lora.png", full_page=True)
        assert not page.errors
    finally:
        site.client.unload_lora("hf-long", "ui-lora")
