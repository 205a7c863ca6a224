"""Image inputs: header-only checks (type, pixel bombs, EXIF size), decoding, base64 / data URLs, allow-list."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from service.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaError
from service.images import decode_for_model as decode_image
from service.images import probe_image
from service.inputs import decode_base64_image, fetch_image_url, host_allowed
from tests.service.images import encode, exif_rotated_jpeg, png_header_only


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_supported_formats_probe_and_decode(fmt: str) -> None:
    data = encode(Image.new("RGB", (40, 30), (200, 10, 10)), fmt)
    probe = probe_image(data, max_image_pixels=10_000)
    assert probe.format == fmt
    assert probe.size == (40, 30)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (40, 30)
    red, green, _ = image.getpixel((20, 15))
    assert red > 150 and green < 60


def test_unsupported_format_is_415() -> None:
    with pytest.raises(UnsupportedMediaError) as info:
        probe_image(encode(Image.new("RGB", (8, 8)), "TIFF"), 10_000)
    assert info.value.status_code == 415
    with pytest.raises(UnsupportedMediaError):
        probe_image(b"definitely not an image", 10_000)


def test_bomb_is_refused_from_the_header_alone() -> None:
    data = png_header_only(50_000, 50_000)  # 2.5 gigapixels, 100-odd bytes
    assert len(data) < 200
    with pytest.raises(PayloadTooLargeError) as info:
        probe_image(data, max_image_pixels=4_000_000)
    assert info.value.status_code == 413
    assert "2500000000" in info.value.message


def test_exif_orientation_swaps_the_probed_size_and_decode_is_upright() -> None:
    upright = Image.new("RGB", (120, 60), (240, 240, 240))
    upright.paste((220, 30, 30), (0, 0, 30, 30))  # red block at the top-left of the upright view
    data = exif_rotated_jpeg(upright, orientation=6)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (60, 120)
    probe = probe_image(data, 1_000_000)
    assert probe.size == (120, 60) and probe.orientation == 6
    image = decode_image(data)
    assert image.size == (120, 60)
    red, green, _ = image.getpixel((10, 10))
    assert red > 180 and green < 90


def test_transparency_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.getpixel((5, 5)) == (255, 255, 255)


def test_truncated_image_is_415_not_500() -> None:
    noise = Image.effect_noise((128, 128), 64).convert("RGB")
    data = encode(noise, "JPEG", quality=95)
    truncated = data[: len(data) // 2]
    probe_image(truncated, 100_000)  # the header is intact
    with pytest.raises(UnsupportedMediaError):
        decode_image(truncated)


def test_base64_and_data_urls() -> None:
    raw = encode(Image.new("RGB", (4, 4)), "PNG")
    text = base64.b64encode(raw).decode()
    assert decode_base64_image(text) == raw
    assert decode_base64_image(f"data:image/png;base64,{text}") == raw
    with pytest.raises(BadRequestError):
        decode_base64_image("not base64 !!")
    with pytest.raises(BadRequestError):
        decode_base64_image("data:image/png,rawbytes")


def test_allowlist_matching() -> None:
    assert host_allowed("https://img.example.com/a.png", ["img.example.com"])
    assert host_allowed("https://cdn.example.com/a.png", ["*.example.com"])
    assert not host_allowed("https://example.com.evil.org/a.png", ["*.example.com", "example.com"])
    assert not host_allowed("https://other.org/a.png", ["img.example.com"])


def test_url_fetch_is_off_without_an_allowlist() -> None:
    with pytest.raises(BadRequestError) as info:
        asyncio.run(fetch_image_url("http://127.0.0.1:1/x.png", [], 1000, 1.0))
    assert info.value.code == "url_fetch_disabled"
    with pytest.raises(BadRequestError) as info:
        asyncio.run(fetch_image_url("http://127.0.0.1:1/x.png", ["img.example.com"], 1000, 1.0))
    assert info.value.code == "url_not_allowed"


@pytest.fixture
def image_server() -> Iterator[str]:
    payload = encode(Image.new("RGB", (16, 8), (0, 200, 0)), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = payload if self.path == "/ok.png" else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_allowed_url_is_fetched_within_the_size_limit(image_server: str) -> None:
    data = asyncio.run(fetch_image_url(f"{image_server}/ok.png", ["127.0.0.1"], 4000, 5.0))
    assert probe_image(data, 1000).size == (16, 8)
    with pytest.raises(PayloadTooLargeError):
        asyncio.run(fetch_image_url(f"{image_server}/big.png", ["127.0.0.1"], 4000, 5.0))
