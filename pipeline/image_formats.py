"""The image formats spatext lets Pillow open: every image it reads may come from an untrusted corpus or folder.

Pillow tries all of its plugins by default. EPS hands the bytes to Ghostscript (which has a history of remote code
execution bugs) and rarely used decoders are attack surface no corpus needs, so each ``Image.open`` names these.
"""

from __future__ import annotations

from PIL import Image

OPEN_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG opens cameras' MPO files too
OPEN_MAP_FORMATS = ("PNG",)  # id maps, segment maps and benchmark masks are PNGs


def recognised_format(data: bytes) -> str | None:
    """The format that one of Pillow's other plugins recognises ``data`` as, from its first bytes only (the plugins'
    ``accept`` checks: no plugin opens the data), or None. For a reject's reason: the format a refused file looks
    like (a weak magic number may name a near relative, e.g. TGA as CUR)."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in OPEN_IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return name
        except Exception:  # some plugins' checks assume enough bytes (DIB unpacks 4): then not theirs
            continue
    return None


def refused_format_reason(data: bytes) -> tuple[str, str]:
    """(reason code, detail) for image bytes Pillow was not allowed to identify, reproducibly (Pillow's own message
    names a memory address): ``unsupported_image_format`` naming the format they look like, else
    ``unreadable_image``."""
    reads = ", ".join(OPEN_IMAGE_FORMATS)
    found = recognised_format(data)
    if found is not None:
        return "unsupported_image_format", f"looks like {found}, a format spatext does not read (it reads {reads})"
    return "unreadable_image", f"not an image in a format spatext reads ({reads})"
