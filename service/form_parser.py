"""A multipart/form-data body already in memory -> its fields and files, with python-multipart, no temp files.

Why not Starlette's `request.form()`: the service reads (and size-checks) the whole body first, so it is
already one `bytes` object. Starlette's parser then writes every file part into a `SpooledTemporaryFile` that
rolls over to disk past 1 MB, through the thread pool, and the route reads it back through the thread pool: on
the request-overhead benchmark's 3 MB JPEG that was most of the 17 ms the API process spent on the request.
Here the same python-multipart parser runs over the bytes once and every part is a slice of them.

Same rules as Starlette's parser: a part with a `filename` in its Content-Disposition is a file, any other part a
text field decoded with the body's charset (latin-1 when that fails); at most `max_files` files and `max_fields`
fields, a text field at most `max_part_size` bytes; a part without a name, a missing boundary or a malformed body
is a 400.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import BadRequestError


@dataclass(frozen=True)
class FilePart:
    """An uploaded file: its bytes and the filename and content type the client gave."""

    data: bytes
    filename: str
    content_type: str | None = None


@dataclass
class FormParts:
    """The parts of a form in body order, by field name."""

    items: list[tuple[str, str | FilePart]] = field(default_factory=list)

    def get(self, name: str) -> str | FilePart | None:
        """The first value of `name`, or None."""
        return next((value for key, value in self.items if key == name), None)

    def getlist(self, name: str) -> list[str | FilePart]:
        """Every value of `name`, in body order."""
        return [value for key, value in self.items if key == name]


class _Collector:
    """python-multipart callbacks that build `FormParts` within the limits."""

    def __init__(self, charset: str, max_files: int, max_fields: int, max_part_size: int) -> None:
        self.charset = charset
        self.max_files, self.max_fields, self.max_part_size = max_files, max_fields, max_part_size
        self.parts = FormParts()
        self.files = self.fields = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._chunks: list[bytes] = []
        self._size = 0

    def on_part_begin(self) -> None:
        self._headers, self._chunks, self._size = {}, [], 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadRequestError(
                'a multipart part has no name (Content-Disposition: form-data; name="...")',
                code="invalid_form",
            )
        self._name = self._decode(options[b"name"])
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise BadRequestError(
                    f"too many files in the form; at most {self.max_files}", code="invalid_form"
                )
            self._filename = self._decode(options[b"filename"])
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise BadRequestError(
                    f"too many fields in the form; at most {self.max_fields}", code="invalid_form"
                )
            self._filename = None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._filename is None and self._size > self.max_part_size:
            raise BadRequestError(
                f"form field '{self._name}' is over {self.max_part_size} bytes", code="invalid_form"
            )
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        if self._filename is None:
            self.parts.items.append((self._name, self._decode(data)))
            return
        content_type = self._headers.get(b"content-type")
        self.parts.items.append(
            (
                self._name,
                FilePart(data, self._filename, content_type.decode("latin-1") if content_type else None),
            )
        )

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")


def parse_form(
    body: bytes, content_type: str, max_files: int, max_fields: int, max_part_size: int
) -> FormParts:
    """The fields and files of a multipart/form-data `body` (see the module docstring for the rules).

    Args:
        body: The whole request body.
        content_type: The request's Content-Type header (its `boundary` and optional `charset`).
        max_files: Most file parts.
        max_fields: Most text parts.
        max_part_size: Most bytes of one text part.

    Raises:
        BadRequestError: No boundary, a malformed body, a nameless part, or a limit exceeded (code
            `invalid_form`).
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequestError("the multipart Content-Type has no boundary", code="invalid_form")
    charset = params.get(b"charset", b"utf-8")
    try:
        charset_name = codecs.lookup(charset.decode("latin-1")).name
    except LookupError:
        charset_name = "latin-1"
    collector = _Collector(charset_name, max_files, max_fields, max_part_size)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequestError(f"the multipart body is malformed: {exc}", code="invalid_form") from None
    return collector.parts


__all__ = ["FilePart", "FormParts", "parse_form"]
