"""shared/images.py: image_url parts turned into checked image bytes under the operator's policy (data URIs;
http(s) only when allowed and never to a non-public address unless allowed, checked on the connected socket;
file:// only from named folders, links resolved)."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from zinfer.shared.errors import InvalidRequest
from zinfer.shared.images import ImagePolicy, image_bytes, public_address
from zinfer.shared.tinyvision import png

WHERE = "messages[0].content[1].image_url"


@pytest.fixture(scope="module")
def server():
    """127.0.0.1 serving /cat.png, /big.png (over 1,000 bytes) and /moved (a redirect to /cat.png)."""
    images = {"/cat.png": png(8, 8), "/big.png": png(64, 64)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", images
    srv.shutdown()


def refused(url: str, policy: ImagePolicy, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as exc:
        image_bytes(url, WHERE, policy)
    assert exc.value.field == WHERE


def test_data_uris_and_their_checks():
    image = png(10, 10)
    assert image_bytes("data:image/png;base64," + base64.b64encode(image).decode(), WHERE, ImagePolicy()) == image
    refused("data:text/plain;base64,aGk=", ImagePolicy(), "not an image")
    refused("data:image/png,rawbytes", ImagePolicy(), "base64")
    refused("data:image/png;base64," + base64.b64encode(image).decode(), ImagePolicy(max_pixels=99), "max_image_pix")
    refused("data:image/png;base64," + base64.b64encode(bytes(5000)).decode(), ImagePolicy(max_bytes=1000),
            "max_image_bytes")


def test_urls_are_fetched_only_when_allowed_and_never_from_private_addresses_unless_allowed(server):
    base, images = server
    refused(f"{base}/cat.png", ImagePolicy(), "image_url_fetch is off")
    refused(f"{base}/cat.png", ImagePolicy(fetch_urls=True), "not a public address")
    allowed = ImagePolicy(fetch_urls=True, private_urls=True)
    assert image_bytes(f"{base}/cat.png", WHERE, allowed) == images["/cat.png"]
    assert image_bytes(f"{base}/moved", WHERE, allowed) == images["/cat.png"]  # a redirect, followed
    refused(f"{base}/missing.png", allowed, "HTTP 404")
    refused(f"{base}/big.png", ImagePolicy(fetch_urls=True, private_urls=True, max_bytes=1000), "max_image_bytes")
    refused("gopher://example.com/x", allowed, "'gopher' URLs")


@pytest.mark.parametrize("address, public", [("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False),
                                             ("192.168.0.1", False), ("169.254.169.254", False), ("::1", False),
                                             ("::ffff:127.0.0.1", False), ("fd00::1", False), ("0.0.0.0", False),
                                             ("224.0.0.1", False), ("2606:4700::1111", True)])
def test_public_addresses(address, public):
    assert public_address(address) is public


def test_file_urls_only_from_named_folders_links_resolved(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(png(4, 4))
    (outside / "b.png").write_bytes(png(4, 4, seed=1))
    (allowed / "link.png").symlink_to(outside / "b.png")
    policy = ImagePolicy(folders=(str(allowed.resolve()),))
    assert image_bytes(f"file://{allowed}/a.png", WHERE, policy) == png(4, 4)
    refused(f"file://{outside}/b.png", policy, "image_folders")
    refused(f"file://{allowed}/link.png", policy, "image_folders")  # a link out of the folder
    refused(f"file://{allowed}/a.png", ImagePolicy(), "image_folders")
