"""Upload checks made before the upload: Feishu's size and type rules and the relay's cap."""

from __future__ import annotations

import pytest

from relay.intents import FileUpload, ImageUpload
from relay.media import FILE_MAX_BYTES, IMAGE_MAX_BYTES, image_type, upload_refusal

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
CAP = 30 * 1024 * 1024


@pytest.mark.parametrize(("data", "kind"), [
    (b"\xff\xd8\xff\xe0" + b"\x00" * 8, "jpeg"), (PNG, "png"), (b"GIF89a....", "gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"), (b"BM" + b"\x00" * 10, "bmp"), (b"\x00\x00\x01\x00\x01\x00", "ico"),
    (b"II*\x00" + b"\x00" * 8, "tiff"), (b"MM\x00*" + b"\x00" * 8, "tiff"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00", "heic"), (b"%PDF-1.4", None), (b"\x00\x00\x00\x18ftypisom", None),
    (b"<svg xmlns=", None),
])
def test_image_types_by_signature(data: bytes, kind: str | None) -> None:
    assert image_type(data) == kind


def test_an_image_within_the_limits_may_go() -> None:
    assert upload_refusal(ImageUpload(id="i", data=PNG), CAP) is None


def test_not_an_image_is_refused_naming_data() -> None:
    reason = upload_refusal(ImageUpload(id="i", data=b"%PDF-1.4 not an image"), CAP)
    assert reason is not None and reason.startswith("data: not an image Feishu takes")


def test_sizes_feishu_refuses() -> None:
    big_image = ImageUpload(id="i", data=PNG + b"\x00" * (IMAGE_MAX_BYTES - len(PNG) + 1))
    assert "10 MB" in (upload_refusal(big_image, CAP) or "")
    big_file = FileUpload(id="f", file_name="a.bin", data=b"\x00" * (FILE_MAX_BYTES + 1))
    assert "30 MB" in (upload_refusal(big_file, CAP) or "")
    assert upload_refusal(FileUpload(id="f", file_name="a.bin", data=b"\x00" * FILE_MAX_BYTES), CAP) is None


def test_the_configured_cap() -> None:
    reason = upload_refusal(FileUpload(id="f", file_name="a.bin", data=b"\x00" * 1001), 1000)
    assert reason == "data: 1001 bytes is more than outbound.max_upload_bytes (1000)"


def test_a_send_with_upload_uploads_by_its_type_then_sends_the_key() -> None:
    from relay.intents import MediaUpload, MessageSend
    from relay.media import file_type, send_with_key, upload_for

    image = MessageSend(id="m", receive_id_type="chat_id", receive_id="oc_1", msg_type="image",
                        upload=MediaUpload(url="https://files.example/a.png"))
    up = upload_for(image)
    assert isinstance(up, ImageUpload) and (up.id, up.url, up.data) == ("m", "https://files.example/a.png", None)
    sent = send_with_key(image, {"image_key": "img_v3_1"})
    assert sent is not None and (sent.content, sent.upload, sent.id) == ({"image_key": "img_v3_1"}, None, "m")
    assert send_with_key(image, {"file_key": "x"}) is None and send_with_key(image, None) is None
    audio = MessageSend(id="a", receive_id_type="chat_id", receive_id="oc_1", msg_type="audio",
                        upload=MediaUpload(url="https://files.example/v.opus", file_name="v.opus", duration=1200))
    up = upload_for(audio)
    assert isinstance(up, FileUpload) and (up.file_type, up.file_name, up.duration) == ("opus", "v.opus", 1200)
    assert send_with_key(audio, {"file_key": "file_v3_9"}).content == {"file_key": "file_v3_9"}  # type: ignore[union-attr]
    assert [file_type("file", n) for n in ("a.PDF", "b.docx", "c.xlsx", "d.pptx", "e.zip")] == [
        "pdf", "doc", "xls", "ppt", "stream"]
    assert file_type("media", "clip.mov") == "mp4"
