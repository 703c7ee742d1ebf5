"""What Feishu refuses of an upload, checked before the upload is made (pure).

feishu-next §E (im-v1/image/create, im-v1/file/create):

    image.upload   not empty, at most 10 MB, one of JPG/JPEG, PNG, WEBP, GIF, BMP, ICO, TIFF, HEIC
    file.upload    not empty, at most 30 MB

and the relay's own ``outbound.max_upload_bytes`` on both (an operator's cap; intents travel through Kafka, so
a cap on what producers may put in them is also a cap on record size). The image's type is read from the
bytes' signature (magic numbers), never from a name or a declared type, so what is checked is what Feishu will
decode. Each refusal is one line naming the field, for a ``rejected`` result.
"""

from __future__ import annotations

from typing import Final

from relay.intents import FileUpload, ImageUpload

__all__ = ["FILE_MAX_BYTES", "IMAGE_MAX_BYTES", "image_type", "upload_refusal"]

MB: Final = 1024 * 1024
IMAGE_MAX_BYTES: Final = 10 * MB  # im-v1/image/create: 不能超过 10 M
FILE_MAX_BYTES: Final = 30 * MB  # im-v1/file/create: 不超过 30 M

# ISO BMFF brands of HEIF/HEIC images (ISO/IEC 23008-12)
_HEIF_BRANDS: Final = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})


def image_type(data: bytes) -> str | None:
    """The format of an image Feishu takes, by its signature, or None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith(b"\x00\x00\x01\x00"):
        return "ico"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "heic"
    return None


def upload_refusal(intent: ImageUpload | FileUpload, max_bytes: int) -> str | None:
    """Why Feishu (or the relay's cap) would refuse this upload, or None when it may go."""
    data = intent.data or b""  # an upload by url is checked once its bytes are downloaded
    size = len(data)
    image = isinstance(intent, ImageUpload)
    feishu_max, what = (IMAGE_MAX_BYTES, "an image") if image else (FILE_MAX_BYTES, "a file")
    if size == 0:
        return f"data: {what} is empty (Feishu refuses empty uploads)"
    if size > feishu_max:
        return f"data: {size} bytes is more than Feishu takes for an {what} ({feishu_max // MB} MB)"
    if size > max_bytes:
        return f"data: {size} bytes is more than outbound.max_upload_bytes ({max_bytes})"
    if image and image_type(data) is None:
        return "data: not an image Feishu takes (JPEG, PNG, WEBP, GIF, BMP, ICO, TIFF or HEIC, by its signature)"
    return None
