"""One image file inspected: readable, fully decodable, and its size.

Light on imports (PIL only): it runs in the worker processes of `data check`, which start with nothing imported.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from captune.data.problems import MISSING_IMAGE, TRUNCATED_IMAGE, UNREADABLE_IMAGE


def inspect_image(path: Path, decode: bool) -> tuple[str | None, str, tuple[int, int] | None]:
    """(problem kind or None, reason, (width, height)): the header alone, or with `decode` every byte decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF and decompression-bomb warnings, once per image
        try:
            with Image.open(path) as image:
                size = image.size
                if decode:
                    # JPEG at 1/8 scale: every byte of the file is still read and entropy-decoded (a truncated or
                    # corrupt file fails as at full size), for half the work
                    image.draft(image.mode, (1, 1))
                    image.load()
            return None, "", size
        except FileNotFoundError:
            return MISSING_IMAGE, "image not found", None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if decode and "truncated" in str(e):
                return TRUNCATED_IMAGE, "truncated image", None
            what = "cannot decode image" if decode else "cannot read image header"
            return UNREADABLE_IMAGE, f"{what}: {e}", None
