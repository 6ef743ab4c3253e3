"""Preview images beside model files (A1111 / Civitai Helper / Stability Matrix names, read by
sdtk.library.sidecars), served only when their bytes are an allowlisted image type: Civitai
Helper writes every preview as `.preview.png` whatever its real format, and a model folder may
hold anything (an HTML or SVG file named .png must never run in this origin)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

from sdtk.web.security import contained

MAX_PREVIEW_BYTES = 32 * 1024 * 1024

# magic bytes -> content type (PNG spec, JFIF/Exif SOI marker, GIF87a/89a, RIFF....WEBP)
IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_image(head: bytes) -> Optional[str]:
    """The image type of these first bytes, or None (anything else: SVG, HTML, scripts...)."""
    for magic, kind in IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def preview_file(model_path: str, names: Sequence[str], index: int, roots: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(real path, content type) of the index-th preview sidecar of a model, when it is inside a
    root (symlinks resolved), a regular file of reasonable size, and sniffs as an image."""
    if not (0 <= index < len(names)):
        return None
    name = names[index]
    if os.sep in name or (os.altsep and os.altsep in name) or name in (".", "..") or "\x00" in name:
        return None
    real = contained(os.path.join(os.path.dirname(model_path), name), roots)
    if real is None or not os.path.isfile(real):
        return None
    try:
        if os.path.getsize(real) > MAX_PREVIEW_BYTES:
            return None
        with open(real, "rb") as fh:
            kind = sniff_image(fh.read(16))
    except OSError:
        return None
    return (real, kind) if kind else None
