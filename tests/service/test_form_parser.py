"""The in-memory multipart parser (`service.form_parser`): the parts Starlette's parser gives, from the bytes.

The HTTP-level behaviour (fields, repeated phrases, non-UTF-8 values, too many fields) is tested over real
uvicorn in `test_hostile_fields.py` / `test_hostile_inputs.py`; these pin the parser's own rules.
"""

from __future__ import annotations

import httpx
import pytest

from service.errors import BadRequestError
from service.form_parser import FilePart, parse_form


def _encoded(data: dict[str, str | list[str]], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://127.0.0.1/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def test_fields_and_files_come_back_in_order_as_sent() -> None:
    image = bytes(range(256)) * 5000  # 1.28 MB of every byte value, boundary-like bytes included
    body, content_type = _encoded(
        {"phrase": ["the red circle", "a blue square"], "budget": "0.25"},
        {"image": ("a.png", image, "image/png")},
    )
    form = parse_form(body, content_type, max_files=2, max_fields=48, max_part_size=10_000_000)
    assert form.getlist("phrase") == ["the red circle", "a blue square"]
    assert form.get("budget") == "0.25"
    upload = form.get("image")
    assert isinstance(upload, FilePart)
    assert upload.data == image and upload.filename == "a.png" and upload.content_type == "image/png"
    assert form.get("missing") is None and form.getlist("missing") == []


def test_non_utf8_text_falls_back_to_latin1() -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="phrase"\r\n\r\n'.encode()
        + b"r\xe9d\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    form = parse_form(body, f"multipart/form-data; boundary={boundary}", 2, 48, 1000)
    assert form.get("phrase") == "r\xe9d"


@pytest.mark.parametrize(
    ("body", "content_type", "limits", "message"),
    [
        (b"--x\r\n\r\n", "multipart/form-data", (2, 48, 1000), "no boundary"),
        (
            b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
            (2, 48, 1000),
            "has no name",
        ),
        (None, None, (0, 48, 1000), "too many files"),
        (None, None, (2, 1, 1000), "too many fields"),
        (None, None, (2, 48, 2), "over 2 bytes"),
        (
            b"--x\r\nthis is not a header line\r\n\r\n",
            "multipart/form-data; boundary=x",
            (2, 48, 1000),
            "malformed",
        ),
    ],
    ids=["no-boundary", "nameless-part", "files", "fields", "field-size", "garbage"],
)
def test_bad_forms_are_400_invalid_form(body, content_type, limits, message) -> None:
    if body is None:
        body, content_type = _encoded(
            {"phrase": "red", "budget": "0.5"}, {"image": ("a.png", b"png", "image/png")}
        )
    with pytest.raises(BadRequestError) as caught:
        parse_form(body, content_type, *limits)
    assert caught.value.code == "invalid_form"
    assert message in caught.value.message
