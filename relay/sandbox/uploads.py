"""Image and file uploads as Feishu takes them, for the sandbox: multipart fields, sizes, types, keys (pure).

docs/feishu-rules.md §5.8 (im-v1/image/create, im-v1/file/create). The request must be multipart/form-data; a
JSON body, or a form without the file part, is 234001. Then:

    images   ``image_type`` message | avatar; ``image`` not empty (234010), at most 10 MB (234006), a JPEG, PNG,
             WEBP, GIF, BMP, ICO, TIFF or HEIC by its signature (234001 otherwise) → ``image_key``
    files    ``file_type`` opus | mp4 | pdf | doc | xls | ppt | stream; ``file_name`` (with an extension);
             ``duration`` a whole number of ms if given; ``file`` not empty (234010), at most 30 MB (234006)
             → ``file_key``

The keys made are remembered per app, so a message that sends an ``image_key`` or ``file_key`` nobody uploaded is
refused (the server checks that). The signature check here is written independently of the relay's own
(``relay.media``): the referee must not share the code it referees.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Final

import msgspec

__all__ = ["FilePart", "UploadRefused", "Uploads"]

MB: Final = 1024 * 1024
IMAGE_MAX: Final = 10 * MB
FILE_MAX: Final = 30 * MB
FILE_TYPES: Final = frozenset({"opus", "mp4", "pdf", "doc", "xls", "ppt", "stream"})
_SIGNATURES: Final = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"\x00\x00\x01\x00",
                      b"II*\x00", b"MM\x00*")
_HEIF: Final = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_NAME: Final = re.compile(r"^[^/\\]*[^/\\.]\.[A-Za-z0-9]+$")


class UploadRefused(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg


class FilePart(msgspec.Struct, frozen=True):
    """The file part of a form, as the server read it."""

    filename: str
    content_type: str
    data: bytes


Form = Mapping[str, "str | FilePart"]


def _is_image(data: bytes) -> bool:
    if data.startswith(_SIGNATURES):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF


def _text(form: Form, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, FilePart):
        raise UploadRefused(234001, f"Invalid request param: {name} must be a text field")
    return value


def _file(form: Form, name: str, limit: int) -> FilePart:
    part = form.get(name)
    if not isinstance(part, FilePart):
        raise UploadRefused(234001, f"Invalid request param: the {name} part is missing")
    if not part.data:
        raise UploadRefused(234010, "File's size can't be 0.")
    if len(part.data) > limit:
        raise UploadRefused(234006, f"The file size exceed the max value ({limit // MB} M).")
    return part


class Uploads:
    """The keys uploaded, by app."""

    def __init__(self) -> None:
        self.images: dict[str, FilePart] = {}  # image_key -> the image (keys are per app: app_id in the dict key)
        self.files: dict[str, FilePart] = {}
        self._owner: dict[str, str] = {}  # key -> app_id

    def clear(self) -> None:
        self.images.clear()
        self.files.clear()
        self._owner.clear()

    def image(self, app_id: str, form: Form | None) -> dict[str, str]:
        if form is None:
            raise UploadRefused(234001, "Invalid request param: the body must be multipart/form-data")
        image_type = _text(form, "image_type")
        if image_type not in ("message", "avatar"):
            raise UploadRefused(234001, "Invalid request param: image_type must be message or avatar")
        part = _file(form, "image", IMAGE_MAX)
        if not _is_image(part.data):
            raise UploadRefused(234001, "Invalid request param: the image is not a supported type")
        key = f"img_v3_{secrets.token_hex(12)}"
        self.images[key], self._owner[key] = part, app_id
        return {"image_key": key}

    def file(self, app_id: str, form: Form | None) -> dict[str, str]:
        if form is None:
            raise UploadRefused(234001, "Invalid request param: the body must be multipart/form-data")
        file_type = _text(form, "file_type")
        if file_type not in FILE_TYPES:
            raise UploadRefused(234001, f"Invalid request param: file_type must be one of {sorted(FILE_TYPES)}")
        name = _text(form, "file_name")
        if not name or not _NAME.match(name):
            raise UploadRefused(234001, "Invalid request param: file_name with its extension is required")
        duration = _text(form, "duration")
        if duration is not None and not duration.isdigit():
            raise UploadRefused(234001, "Invalid request param: duration must be milliseconds")
        part = _file(form, "file", FILE_MAX)
        key = f"file_v3_{secrets.token_hex(12)}"
        self.files[key], self._owner[key] = part, app_id
        return {"file_key": key}

    def uploaded(self, app_id: str, key: str) -> bool:
        return self._owner.get(key) == app_id
