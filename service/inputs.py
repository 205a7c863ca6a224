"""Image inputs: bytes from multipart, base64, `data:` URLs or allow-listed http(s) URLs, checked then decoded.

Two steps on purpose (serving-anchors: "admit first, decode after"):

1. `probe_image` reads only the header (PIL's lazy `Image.open`): format and size. It refuses unsupported types
   (415) and images over `max_image_pixels` (413) before a single pixel is decompressed, so a decompression bomb
   costs microseconds. The EXIF orientation is read here too, so the size used for admission is the upright one.
2. `decode_image` (run in a thread, off the event loop) decodes the first frame, applies the EXIF orientation
   and flattens transparency onto white, giving the RGB image the model sees.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaError

SUPPORTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
"""PIL format names accepted as input (GIF and animated WebP: first frame)."""

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # transposes and 90-degree rotations swap width and height
_DATA_URL_RE = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.DOTALL
)


@dataclass(frozen=True)
class ImageProbe:
    """What the header says about an image, before decoding.

    Attributes:
        format: PIL format name, e.g. "PNG".
        size: (width, height) upright, i.e. after the EXIF orientation is applied.
        orientation: EXIF orientation tag (1 = as stored).
    """

    format: str
    size: tuple[int, int]
    orientation: int


def configure_pil(max_image_pixels: int) -> None:
    """Make PIL's own bomb guard agree with ours (it raises at 2x its limit and only warns at 1x).

    The warning is silenced: `probe_image` refuses everything above 1x with a 413 anyway.
    """
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def probe_image(data: bytes, max_image_pixels: int) -> ImageProbe:
    """Check type and size from the header alone.

    Args:
        data: The encoded image.
        max_image_pixels: Largest accepted width x height.

    Returns:
        The probe.

    Raises:
        BadRequestError: Empty data.
        UnsupportedMediaError: Not an image PIL recognises, or a format outside `SUPPORTED_FORMATS`.
        PayloadTooLargeError: Width x height above `max_image_pixels`.
    """
    if not data:
        raise BadRequestError("the image is empty", code="empty_image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "unknown"
            width, height = img.size
            orientation = 1
            if fmt in SUPPORTED_FORMATS:
                try:
                    orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
                except Exception:  # a broken EXIF block must not fail the request: treat as upright
                    orientation = 1
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(str(exc), code="image_too_large") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnsupportedMediaError(
            f"the data is not a readable image ({exc.__class__.__name__}); send PNG, JPEG, WebP, GIF or BMP",
            code="unsupported_image_type",
        ) from exc
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedMediaError(
            f"image format {fmt} is not supported; send one of {sorted(SUPPORTED_FORMATS)}",
            code="unsupported_image_type",
        )
    if width < 1 or height < 1:
        raise BadRequestError(f"the image has no pixels ({width}x{height})", code="empty_image")
    if width * height > max_image_pixels:
        raise PayloadTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}",
            code="image_too_large",
        )
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageProbe(format=fmt, size=(width, height), orientation=orientation)


def decode_image(data: bytes) -> Image.Image:
    """Decode the first frame to upright RGB; call only after `probe_image` accepted the data.

    Raises:
        UnsupportedMediaError: The data is truncated or corrupt beyond its header.
        PayloadTooLargeError: PIL's own bomb guard fired.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(str(exc), code="image_too_large") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UnsupportedMediaError(f"the image could not be decoded: {exc}", code="corrupt_image") from exc


_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a bare convert would show transparent pixels as black).

    16-bit greyscale (PNG) is scaled to 8 bits first: PIL's own convert clips every value above 255 to white.
    """
    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(wide >> 8, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def decode_base64_image(value: str) -> bytes:
    """Bytes of a `data:` URL (`data:image/png;base64,...`) or of a bare base64 string.

    Raises:
        BadRequestError: Not valid base64, or a `data:` URL that is not base64-encoded.
    """
    text = value.strip()
    if text.startswith("data:"):
        match = _DATA_URL_RE.match(text)
        if match is None:
            raise BadRequestError(
                "a data: URL must be base64-encoded: data:image/png;base64,...", code="bad_image"
            )
        text = match.group("data")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"the image is not valid base64: {exc}", code="bad_image") from exc


def is_remote_url(value: str) -> bool:
    """True for http(s) URLs (which need the allow-list), False for data URLs and bare base64."""
    return value.strip().lower().startswith(("http://", "https://"))


def host_allowed(url: str, allowlist: list[str]) -> bool:
    """Whether the URL's host is on the allow-list (exact host, or `*.example.com` for its subdomains)."""
    host = (urlsplit(url).hostname or "").lower()
    if not host:
        return False
    for entry in allowlist:
        entry = entry.lower()
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


async def fetch_image_url(url: str, allowlist: list[str], max_bytes: int, timeout_s: float) -> bytes:
    """Download an image URL, but only from an allow-listed host, without redirects, within `max_bytes`.

    Raises:
        BadRequestError: No allow-list, host not allowed, or the fetch failed.
        PayloadTooLargeError: The body exceeds `max_bytes`.
    """
    if not allowlist:
        raise BadRequestError(
            "the server does not fetch image URLs (no NUWA_IMAGE_URL_ALLOWLIST); send the image as a data: URL",
            code="url_fetch_disabled",
        )
    if not host_allowed(url, allowlist):
        raise BadRequestError(
            f"image URL host is not on the allow-list: {urlsplit(url).hostname}", code="url_not_allowed"
        )
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise BadRequestError(
                        f"fetching the image URL answered HTTP {response.status_code}",
                        code="url_fetch_failed",
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLargeError(
                            f"the image at the URL is larger than {max_bytes} bytes", code="image_too_large"
                        )
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise BadRequestError(
            f"fetching the image URL failed: {exc.__class__.__name__}", code="url_fetch_failed"
        ) from exc
    return b"".join(chunks)


__all__ = [
    "SUPPORTED_FORMATS",
    "ImageProbe",
    "configure_pil",
    "decode_base64_image",
    "decode_image",
    "fetch_image_url",
    "host_allowed",
    "is_remote_url",
    "probe_image",
]
