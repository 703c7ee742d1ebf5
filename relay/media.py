"""What Feishu refuses of an upload, checked before the upload is made (pure).

docs/feishu-rules.md §5.8 (im-v1/image/create, im-v1/file/create):

    image.upload   not empty, at most 10 MB, one of JPG/JPEG, PNG, WEBP, GIF, BMP, ICO, TIFF, HEIC
    file.upload    not empty, at most 30 MB

and the relay's own ``outbound.max_upload_bytes`` on both (an operator's cap; intents travel through Kafka, so
a cap on what producers may put in them is also a cap on record size). The image's type is read from the
bytes' signature (magic numbers), never from a name or a declared type, so what is checked is what Feishu will
decode. Each refusal is one line naming the field, for a ``rejected`` result.
"""

from __future__ import annotations

from typing import Any, Final

from relay.intents import FileType, FileUpload, ImageUpload, MessageSend

__all__ = ["FILE_MAX_BYTES", "IMAGE_MAX_BYTES", "file_type", "image_type", "send_with_key", "upload_for",
           "upload_refusal"]

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


# docs/feishu-rules.md §5.8, file/create file_type: opus, mp4, pdf, doc, xls, ppt, else stream
_EXTENSIONS: Final[dict[str, FileType]] = {"pdf": "pdf", "doc": "doc", "docx": "doc", "xls": "xls", "xlsx": "xls",
                                           "ppt": "ppt", "pptx": "ppt", "opus": "opus", "mp4": "mp4"}


def file_type(msg_type: str, file_name: str) -> FileType:
    """The ``file_type`` of an upload for a message of ``msg_type``: audio is opus, media mp4
    (docs/feishu-rules.md §5.8: other audio must be converted), a file by its name's extension."""
    if msg_type == "audio":
        return "opus"
    if msg_type == "media":
        return "mp4"
    return _EXTENSIONS.get(file_name.rsplit(".", 1)[-1].lower(), "stream")


def upload_for(send: MessageSend) -> ImageUpload | FileUpload:
    """The upload a ``message.send`` with ``upload`` makes first (same id, app and expiry), by its url."""
    upload = send.upload
    assert upload is not None
    if send.msg_type == "image":
        return ImageUpload(id=send.id, app=send.app, expires_at=send.expires_at, url=upload.url)
    assert upload.file_name is not None  # checked at decode for every other type
    return FileUpload(id=send.id, app=send.app, expires_at=send.expires_at, url=upload.url,
                      file_name=upload.file_name, duration=upload.duration,
                      file_type=file_type(send.msg_type, upload.file_name))


def send_with_key(send: MessageSend, data: Any) -> MessageSend | None:
    """The message to send once the upload answered ``data``: its key as the content (docs/feishu-rules.md §5.8: image
    ``{"image_key"}``, file/audio/media ``{"file_key"}``), or None when the answer holds no key."""
    name = "image_key" if send.msg_type == "image" else "file_key"
    key = data.get(name) if isinstance(data, dict) else None
    if not isinstance(key, str) or not key:
        return None
    return MessageSend(id=send.id, app=send.app, expires_at=send.expires_at, order_key=send.order_key,
                       receive_id_type=send.receive_id_type, receive_id=send.receive_id, msg_type=send.msg_type,
                       content={name: key})
