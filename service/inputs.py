"""Where an image's bytes come from: a multipart upload, base64, a `data:` URL, or an allow-listed http(s) URL.

Only bytes are produced here; `service.images` reads the header and the worker decodes. Every way in is bounded:
base64 is decoded off the event loop when large (`service.offload`), a `data:` URL must say it holds an image,
any other URL scheme is refused by name, and a URL fetch is bounded in TOTAL time (not per read: an origin that
trickles one byte at a time cannot hold a request past the fetch timeout or the request's deadline) and in size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from urllib.parse import urlsplit

import httpx

from service.errors import BadRequestError, DeadlineExceededError, PayloadTooLargeError, UnsupportedMediaError
from service.offload import Offloader
from service.settings import Settings

_DATA_URL_RE = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.DOTALL
)
_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,15}):")


def decode_base64_image(value: str) -> bytes:
    """Bytes of a `data:` URL (`data:image/png;base64,...`) or of a bare base64 string.

    Raises:
        BadRequestError: Not valid base64, a `data:` URL that is not base64-encoded, or a URL of another scheme.
        UnsupportedMediaError: A `data:` URL whose media type is not an image.
    """
    text = value.strip()
    scheme = _SCHEME_RE.match(text)
    if text[:5].lower() == "data:":
        match = _DATA_URL_RE.match(text)
        if match is None:
            raise BadRequestError(
                "a data: URL must be base64-encoded: data:image/png;base64,...", code="bad_image"
            )
        mime = (match.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise UnsupportedMediaError(
                f"a data: URL must carry an image (data:image/...), got {mime or 'no media type'!r}",
                code="unsupported_image_type",
            )
        text = match.group("data")
    elif scheme is not None and "://" in text[: scheme.end() + 3]:
        raise BadRequestError(
            f"image URLs with the scheme {scheme.group('scheme')!r} are not supported; send the image as a "
            "multipart upload, base64, a data:image/...;base64 URL, or an allow-listed http(s) URL",
            code="unsupported_url_scheme",
        )
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
    """Download an image URL, but only from an allow-listed host, without redirects, within `max_bytes` and
    `timeout_s` IN TOTAL (connect, headers and every read together).

    Raises:
        BadRequestError: No allow-list, host not allowed, or the fetch failed.
        PayloadTooLargeError: The body exceeds `max_bytes`.
        DeadlineExceededError: The whole fetch took longer than `timeout_s`.
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
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, max_bytes, timeout_s)
    except TimeoutError:
        raise DeadlineExceededError(
            f"fetching the image URL took longer than {timeout_s:.3g} s in total "
            f"(gave up after {time.monotonic() - started:.1f} s; NUWA_URL_FETCH_TIMEOUT_S or the request deadline)",
            code="url_fetch_timeout",
        ) from None


async def _fetch(url: str, max_bytes: int, timeout_s: float) -> bytes:
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


async def image_bytes_of(
    upload: bytes | None, ref: str | None, settings: Settings, offload: Offloader, deadline: float
) -> bytes:
    """The encoded image from an upload or a reference string (400 when there is none), within the deadline."""
    if upload is not None:
        return upload
    if ref is None or not ref.strip():
        raise BadRequestError("missing field 'image'", code="missing_field")
    if is_remote_url(ref):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError("the request deadline passed before the image URL was fetched")
        return await fetch_image_url(
            ref.strip(),
            settings.image_url_allowlist,
            settings.max_body_bytes,
            min(settings.url_fetch_timeout_s, remaining),
        )
    return await offload.run(len(ref), decode_base64_image, ref)


__all__ = [
    "decode_base64_image",
    "fetch_image_url",
    "host_allowed",
    "image_bytes_of",
    "is_remote_url",
]
