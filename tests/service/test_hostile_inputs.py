"""Hostile and odd inputs over real HTTP: every one gets its documented 4xx or a correct 200, never a 5xx.

The corpus is generated here (nothing binary is committed): truncated PNG/JPEG, a zero-byte file, text named
.png, a 1x1 image, a 20000x20000 header (bomb), CMYK and 16-bit images, a palette PNG with transparency, an
animated GIF, an EXIF-rotated JPEG, a 1 MB phrase and non-UTF-8 form fields. For each 200 the test checks the
answer is right for that input (size as displayed, boxes inside the image, the first GIF frame, white behind
transparency), not only that something came back.

Issue 15 added: images whose metadata or size PIL reports in its own terms (a JPEG over the limit named PIL's
2x limit, a PNG with a huge zTXt chunk was "not an image"), image references that are not images (file://,
data:text/plain), and special tokens of the model's tokenizer in user text (read as control tokens before).
Connection-level cases are in test_hostile_http.py, field values in test_hostile_fields.py, memory and event-loop
cases in test_hostile_load.py.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from service.images import decode_for_model as decode_image
from tests.service.helpers import answer, assert_error, ground, red_circle_png
from tests.service.images import encode, exif_rotated_jpeg, png_header_only


def _noise(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.effect_noise(size, 64).convert("RGB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_rgb16(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG of one colour, written by hand (PIL cannot write one)."""
    pixel = b"".join(struct.pack(">H", value) for value in rgb)
    raw = b"".join(b"\x00" + pixel * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def grey16_png(size: tuple[int, int] = (64, 48)) -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale ramp PNG and its pixel values."""
    width, height = size
    values = (np.arange(width * height, dtype=np.uint32).reshape(height, width) * 21).astype(np.uint16)
    return encode(Image.fromarray(values)), values


def palette_png_with_transparency() -> bytes:
    """A palette PNG: index 0 fully transparent (must become white), index 1 opaque red."""
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 220, 30, 30] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 20, 40))
    return encode(image, transparency=0)


def animated_gif() -> bytes:
    """Two frames: red first, blue second; only the first may be used."""
    first = Image.new("RGB", (48, 32), (220, 30, 30))
    second = Image.new("RGB", (48, 32), (30, 60, 220))
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- 4xx corpus

REFUSED: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("truncated_png", lambda: encode(_noise())[:400], 415, "corrupt_image"),
    ("truncated_jpeg", lambda: encode(_noise((128, 128)), "JPEG", quality=95)[:1500], 415, "corrupt_image"),
    ("zero_bytes", lambda: b"", 400, "empty_image"),
    ("text_named_png", lambda: b"this is a text file, not a PNG\n" * 10, 415, "unsupported_image_type"),
    ("bomb_header_20000x20000", lambda: png_header_only(20_000, 20_000), 413, "image_too_large"),
    ("png_signature_only", lambda: b"\x89PNG\r\n\x1a\n", 415, "unsupported_image_type"),
    ("tiff_is_not_accepted", lambda: encode(Image.new("RGB", (8, 8)), "TIFF"), 415, "unsupported_image_type"),
]


@pytest.mark.parametrize(("name", "make", "status", "code"), REFUSED, ids=[row[0] for row in REFUSED])
def test_bad_images_get_their_documented_4xx(
    client: httpx.Client, name: str, make: Callable[[], bytes], status: int, code: str
) -> None:
    response = ground(client, make(), "the red circle")
    assert_error(response, status, code)


def test_truncated_files_keep_a_readable_header() -> None:
    """The truncated cases above really are 'header fine, data cut' (else they would test the 415 of junk)."""
    from service.images import probe_image

    assert probe_image(encode(_noise())[:400], 10**6).size == (96, 64)
    assert probe_image(encode(_noise((128, 128)), "JPEG", quality=95)[:1500], 10**6).size == (128, 128)


def test_bomb_is_refused_before_decoding_even_as_base64_json(client: httpx.Client) -> None:
    import base64

    bomb = base64.b64encode(png_header_only(20_000, 20_000)).decode()
    response = client.post("/ground", json={"image": bomb, "phrase": "the red circle"})
    error = assert_error(response, 413, "image_too_large")
    assert "400000000" in error["message"] or "20000x20000" in error["message"]


# --------------------------------------------------------------------------------------------- 200 corpus


def _ok(response: httpx.Response, size: tuple[int, int]) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image_size"] == list(size)
    width, height = size
    for box in body["boxes"]:
        x1, y1, x2, y2 = box["xyxy"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, box
    return body


def test_one_by_one_image(client: httpx.Client) -> None:
    _ok(ground(client, encode(Image.new("RGB", (1, 1), (200, 10, 10))), "the red circle"), (1, 1))


def test_cmyk_jpeg(client: httpx.Client) -> None:
    data = encode(Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG")
    _ok(ground(client, data, "the red circle"), (80, 60))
    red, green, blue = decode_image(data).getpixel((40, 30))
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_greyscale_png_is_scaled_not_clipped(client: httpx.Client) -> None:
    data, values = grey16_png()
    _ok(ground(client, data, "the red circle"), (64, 48))
    decoded = np.asarray(decode_image(data))
    assert decoded.shape == (48, 64, 3)
    expected = (values >> 8).astype(np.uint8)
    assert np.array_equal(
        decoded[..., 0], expected
    )  # a plain convert would clip everything above 255 to white
    assert decoded.mean() < 200


def test_16_bit_rgb_png(client: httpx.Client) -> None:
    data = png_rgb16(50, 40, (56000, 8000, 8000))
    _ok(ground(client, data, "the red circle"), (50, 40))
    assert decode_image(data).getpixel((10, 10)) == (56000 >> 8, 8000 >> 8, 8000 >> 8)


def test_palette_png_with_transparency_is_flattened_on_white(client: httpx.Client) -> None:
    data = palette_png_with_transparency()
    _ok(ground(client, data, "the red circle"), (40, 40))
    image = decode_image(data)
    assert image.getpixel((5, 5)) == (220, 30, 30)
    assert image.getpixel((35, 5)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame(client: httpx.Client) -> None:
    data = animated_gif()
    with Image.open(io.BytesIO(data)) as gif:
        assert getattr(gif, "n_frames", 1) == 2
    _ok(ground(client, data, "the red circle"), (48, 32))
    red, green, blue = decode_image(data).getpixel((24, 16))
    assert red > 180 and blue < 90


def test_exif_rotated_jpeg_answers_in_the_displayed_orientation(client: httpx.Client) -> None:
    upright = Image.new("RGB", (300, 120), (236, 232, 226))
    upright.paste((220, 30, 30), (20, 20, 80, 80))
    data = exif_rotated_jpeg(upright, orientation=6)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (120, 300)  # stored sideways
    body = _ok(ground(client, data, "the red circle", budget=64), (300, 120))  # answered upright
    for box in body["boxes"]:
        assert box["xyxy_norm"] == pytest.approx(
            [box["xyxy"][0] / 300, box["xyxy"][1] / 120, box["xyxy"][2] / 300, box["xyxy"][3] / 120]
        )


@pytest.mark.parametrize("size", [(3000, 1), (200_000, 1), (1, 200_000)])
def test_extreme_aspect_ratio_is_answered_without_a_huge_canvas(client: httpx.Client, size) -> None:
    """LLaVA pads to a square: without the shrink before padding a 200000x1 image (200k pixels, a few hundred
    bytes as PNG) became a 200000 x 200000 canvas (MemoryError, 500). Now it is shrunk first and answered."""
    response = ground(client, encode(Image.new("RGB", size, (10, 200, 10))), "the red circle")
    _ok(response, size)


# --------------------------------------------------------------------------------------------- text fields


def test_one_megabyte_phrase_is_422_not_a_crash(client: httpx.Client) -> None:
    huge = "the red circle " * 70_000  # ~1 MB
    assert len(huge) > 1_000_000
    assert_error(ground(client, red_circle_png(), huge), 422, "text_too_long")
    import base64

    image = base64.b64encode(red_circle_png()).decode()
    assert_error(client.post("/ground", json={"image": image, "phrase": huge}), 422, "text_too_long")


def _multipart(fields: list[tuple[bytes, bytes]], image: bytes) -> tuple[bytes, str]:
    """A hand-built multipart body whose field VALUES are raw bytes (httpx would encode str as UTF-8)."""
    boundary = "nuwaboundary7d2f"
    parts = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="'.encode()
            + name
            + b'"\r\n\r\n'
            + value
            + b"\r\n"
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_non_utf8_phrase_is_answered_not_crashed(client: httpx.Client) -> None:
    body, content_type = _multipart([(b"phrase", b"the r\xe9d \xff\xfe circle")], red_circle_png())
    response = client.post("/ground", content=body, headers={"Content-Type": content_type})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        phrase = response.json()["phrase"]
        assert phrase.startswith("the r") and phrase.endswith("circle")
    else:
        assert_error(response, 400)


def test_non_utf8_budget_and_method_are_422(client: httpx.Client) -> None:
    png = red_circle_png()
    body, content_type = _multipart([(b"phrase", b"the red circle"), (b"budget", b"\xff64")], png)
    response = client.post("/ground", content=body, headers={"Content-Type": content_type})
    assert_error(response, 422, "invalid_budget")
    body, content_type = _multipart([(b"phrase", b"the red circle"), (b"method", b"nu\xffwa")], png)
    response = client.post("/ground", content=body, headers={"Content-Type": content_type})
    assert_error(response, 422, "invalid_method")


def test_non_utf8_json_body_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/ground",
        content=b'{"image": "\xff\xfe", "phrase": "the red \xe9 circle"}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 400, "invalid_json")


# --------------------------------------------------------------------------------------------- issue 15: images

MAX_PIXELS = 4_000_000  # NUWA_MAX_IMAGE_PIXELS of the main test server


@pytest.mark.parametrize("size", [(3000, 3000), (2100, 2000)], ids=["over_2x_limit", "between_1x_and_2x"])
def test_a_jpeg_over_the_limit_reports_our_limit(client: httpx.Client, size: tuple[int, int]) -> None:
    """PIL refuses at open beyond TWICE its limit with its own number; the answer must name NUWA_MAX_IMAGE_PIXELS."""
    data = encode(Image.new("RGB", size, (200, 200, 200)), "JPEG", quality=50)
    error = assert_error(ground(client, data, "the red circle"), 413, "image_too_large")
    assert f"{size[0] * size[1]}" in error["message"], error
    assert f"{MAX_PIXELS}" in error["message"] and "NUWA_MAX_IMAGE_PIXELS" in error["message"], error
    assert f"{2 * MAX_PIXELS}" not in error["message"], error


def _png_with_chunk(kind: bytes, data: bytes, copies: int = 1) -> bytes:
    """An 8x8 PNG with an extra ancillary chunk (`copies` times) before its pixel data."""
    plain = encode(Image.new("RGB", (8, 8), (10, 200, 10)))
    ihdr_end = 8 + 25  # signature, then the IHDR chunk (4 length + 4 type + 13 data + 4 CRC)
    return plain[:ihdr_end] + _chunk(kind, data) * copies + plain[ihdr_end:]


@pytest.mark.parametrize(
    ("kind", "data", "copies"),
    [
        (b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 8_000_000, 9), 1),  # 8 MB of text in ~8 KB
        (b"iTXt", b"Comment\x00\x01\x00\x00\x00" + zlib.compress(b"B" * 8_000_000, 9), 1),
        (b"zTXt", b"Comment\x00\x00" + zlib.compress(b"C" * 1_000_000, 9), 80),  # 80 MB of text in ~80 KB
    ],
    ids=["zTXt", "compressed_iTXt", "many_zTXt"],
)
def test_a_png_with_a_huge_text_chunk_is_413_metadata(
    client: httpx.Client, kind: bytes, data: bytes, copies: int
) -> None:
    """Compressed text over 1 MiB in one chunk or 4 MiB in all; plain tEXt is bounded by the body limit."""
    data = _png_with_chunk(kind, data, copies)
    assert len(data) < 2_000_000
    error = assert_error(ground(client, data, "the red circle"), 413, "image_metadata_too_large")
    assert "metadata" in error["message"] and "send PNG" not in error["message"]


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "FILE://localhost/etc/hosts", "ftp://127.0.0.1/a.png", "gopher://127.0.0.1:70/"],
)
def test_urls_of_other_schemes_are_400_unsupported_url_scheme(client: httpx.Client, url: str) -> None:
    scheme = url.split(":")[0]
    error = assert_error(
        client.post("/ground", json={"image": url, "phrase": "the red circle"}), 400, "unsupported_url_scheme"
    )
    assert repr(scheme) in error["message"] and "base64" not in error["message"].split(";")[0]
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "a"}],
            }
        ]
    }
    assert_error(client.post("/v1/chat/completions", json=chat), 400, "unsupported_url_scheme")


@pytest.mark.parametrize("media_type", ["text/plain", "application/octet-stream", "text/html"])
def test_a_data_url_that_is_not_an_image_is_415_even_with_png_bytes(
    client: httpx.Client, media_type: str
) -> None:
    url = f"data:{media_type};base64," + base64.b64encode(red_circle_png()).decode()
    response = client.post("/ground", json={"image": url, "phrase": "the red circle"})
    error = assert_error(response, 415, "unsupported_image_type")
    assert media_type in error["message"]
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "a"}],
            }
        ]
    }
    assert_error(client.post("/v1/chat/completions", json=chat), 415, "unsupported_image_type")


# --------------------------------------------------------------------------------------------- issue 15: text

BUILTIN_SPECIAL_TOKENS = ["<image>", "<loc_1>", "<loc_999>", "</s>", "<s>", "<pad>"]


def _chat_with(text: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(red_circle_png()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("token", BUILTIN_SPECIAL_TOKENS)
def test_special_tokens_in_user_text_are_422_naming_the_token(client: httpx.Client, token: str) -> None:
    text = f"the red {token} circle"
    png = red_circle_png()
    responses = {
        "phrase": ground(client, png, text),
        "question": answer(client, png, text),
        "messages[-1] (user text)": client.post("/v1/chat/completions", json=_chat_with(text)),
        "phrase (second of two)": client.post(
            "/ground",
            json={"image": base64.b64encode(png).decode(), "phrases": ["the red circle", text]},
        ),
    }
    for field, response in responses.items():
        error = assert_error(response, 422, "special_token_in_text")
        assert repr(token) in error["message"], (field, error)
        assert "plain text" in error["message"]


def test_lookalikes_of_special_tokens_are_plain_text(client: httpx.Client) -> None:
    for text in (
        "the red circle <img>",
        "the red circle <loc>",
        "the red circle < image >",
        "the red circle </",
    ):
        response = ground(client, red_circle_png(), text, budget=64)
        assert response.status_code == 200, (text, response.text)
        assert response.json()["phrase"] == text


def test_the_server_still_answers_after_the_corpus(client: httpx.Client) -> None:
    response = ground(client, red_circle_png(), "the red circle", budget=32)
    assert response.status_code == 200, response.text
    assert client.get("/healthz").json()["status"] == "ok"
