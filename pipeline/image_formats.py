"""The image formats spatext lets Pillow open: every image it reads may come from an untrusted corpus or folder.

Pillow tries all of its plugins by default. EPS hands the bytes to Ghostscript (which has a history of remote code
execution bugs) and rarely used decoders are attack surface no corpus needs, so each ``Image.open`` names these.
"""

from __future__ import annotations

OPEN_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG opens cameras' MPO files too
OPEN_MAP_FORMATS = ("PNG",)  # id maps, segment maps and benchmark masks are PNGs
