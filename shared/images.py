"""Images of chat messages where a request comes in (the gateway, the client): OpenAI's `image_url` parts turned
into the image's bytes under the operator's policy, and checked with Pillow before anything is sent on.

- `data:image/...;base64,...` URIs always;
- `http(s)://` only with `image_url_fetch` on: a size limit while reading, a timeout, redirects followed (each
  hop checked), and never to a loopback, private, link-local or otherwise non-public address unless
  `image_url_private` is on. The address is checked on the connected socket, so a name that resolves to a
  public address once and a private one the next time (DNS rebinding) is still refused;
- `file://` only from the folders `image_folders` names (after resolving links);
- then: at most `max_images` images a request, `max_image_bytes` bytes and `max_image_pixels` pixels each, and
  a file Pillow can read. Every refusal names the content part (messages[i].content[j].image_url).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from zinfer.shared.errors import InvalidRequest


@dataclass(frozen=True)
class ImagePolicy:
    max_images: int = 8
    max_bytes: int = 5 * 2**20
    max_pixels: int = 4096 * 4096
    fetch_urls: bool = False
    private_urls: bool = False
    timeout_s: float = 10.0
    folders: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_settings(cls, settings) -> ImagePolicy:
        return cls(max_images=settings.max_images, max_bytes=settings.max_image_bytes,
                   max_pixels=settings.max_image_pixels, fetch_urls=settings.image_url_fetch,
                   private_urls=settings.image_url_private, timeout_s=settings.image_url_timeout_s,
                   folders=tuple(os.path.realpath(os.path.expanduser(f)) for f in settings.image_folders))


def image_bytes(url: str, where: str, policy: ImagePolicy) -> bytes:
    """The image an image_url part's url names, checked (kind, bytes, pixels); refusals name `where`."""
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}: image_url.url must be a data URI or a URL", field=where)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = _from_data_uri(url, where, policy)
    elif scheme in ("http", "https"):
        if not policy.fetch_urls:
            raise InvalidRequest(f"{where}: image URLs are not fetched here (image_url_fetch is off): send the image "
                                 "as a data URI (data:image/png;base64,...)", field=where)
        data = _fetch(url, where, policy)
    elif scheme == "file":
        data = _from_file(url, where, policy)
    else:
        raise InvalidRequest(f"{where}: {scheme!r} URLs are not taken; send a data URI (data:image/png;base64,...)",
                             field=where)
    check_image(data, where, policy)
    return data


def check_image(data: bytes, where: str, policy: ImagePolicy, verify: bool = True) -> tuple[int, int]:
    """(width, height) of an image file Pillow reads, within the policy's bytes and pixels; else a typed error.
    verify=False reads the header only (the sizes), for a file that was checked whole where it came in."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > policy.max_bytes:
        raise InvalidRequest(f"{where}: the image is {len(data):,} bytes; at most {policy.max_bytes:,} "
                             "(max_image_bytes)", field=where)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > policy.max_pixels:
                raise InvalidRequest(f"{where}: the image is {width} x {height} pixels; at most "
                                     f"{policy.max_pixels:,} pixels (max_image_pixels)", field=where)
            if verify:
                im.verify()
    except UnidentifiedImageError:
        raise InvalidRequest(f"{where}: not an image: no image format Pillow reads (PNG, JPEG, GIF, WebP, BMP, ...)",
                             field=where) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{where}: a broken image ({exc})", field=where) from None
    return width, height


def _from_data_uri(url: str, where: str, policy: ImagePolicy) -> bytes:
    head, comma, payload = url.partition(",")
    kind = head[5:].split(";")[0].strip().lower()
    if not comma or not head.lower().endswith(";base64"):
        raise InvalidRequest(f"{where}: a data URI must be data:image/<type>;base64,<data>", field=where)
    if not kind.startswith("image/"):
        raise InvalidRequest(f"{where}: a data URI of {kind or 'no type'!r}, not an image (data:image/...)",
                             field=where)
    if len(payload) > (policy.max_bytes + 2) // 3 * 4 + 4:
        raise InvalidRequest(f"{where}: the image is over {policy.max_bytes:,} bytes (max_image_bytes)", field=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the data URI's base64 does not decode", field=where) from None


def _from_file(url: str, where: str, policy: ImagePolicy) -> bytes:
    path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not any(path == folder or path.startswith(folder + os.sep) for folder in policy.folders):
        raise InvalidRequest(f"{where}: file URLs are taken only from the folders image_folders names"
                             f"{' (none)' if not policy.folders else ''}", field=where)
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as exc:
        raise InvalidRequest(f"{where}: cannot read {path}: {exc.strerror}", field=where) from None
    return data


def public_address(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class _Refused(Exception):
    pass


def _checked(connection_class, private: bool):
    class Checked(connection_class):
        def connect(self):
            super().connect()
            peer = self.sock.getpeername()[0]
            if not private and not public_address(peer):
                self.sock.close()
                raise _Refused(f"{self.host} is at {peer}, not a public address (image_url_private is off)")

    return Checked


def _fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    http_conn = _checked(http.client.HTTPConnection, policy.private_urls)
    https_conn = _checked(http.client.HTTPSConnection, policy.private_urls)

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req)

    opener = urllib.request.OpenerDirector()
    for handler in (Http(), Https(), urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "zinfer"}), timeout=policy.timeout_s) \
                as response:
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise InvalidRequest(f"{where}: fetching the image gave HTTP {exc.code}", field=where) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, _Refused, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, _Refused):
            raise InvalidRequest(f"{where}: refused: {reason}", field=where) from None
        raise InvalidRequest(f"{where}: cannot fetch the image: {reason}", field=where) from None
    return data
