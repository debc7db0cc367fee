"""InternVL2's dynamic-resolution image tiling and eval transform, reproduced pixel for pixel.

InternVL2 does not squash an image into one 448 x 448 input: it picks the grid of 448 px tiles whose
aspect ratio is closest to the image's (at most `max_tiles` tiles), resizes the image onto that grid
with PIL's bicubic filter, cuts it into tiles and adds a 448 px thumbnail of the whole image. Every
tile is then normalised with the ImageNet mean and std.

transformers' GotOcr2 image processor (the one its native InternVL class uses) follows the same idea
but is not pixel-identical: it resizes differently, so a model fine-tuned or evaluated through it sees
other inputs than the original InternVL2 code feeds. This module reproduces the original exactly,
with PIL, numpy and torch only (no torchvision).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captune.errors import CaptuneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and return it fully decoded as RGB; a bad file raises CaptuneError."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise CaptuneError("image not found", path) from None
    except IsADirectoryError:
        raise CaptuneError("is a folder, not an image", path) from None
    except PermissionError:
        raise CaptuneError("permission denied reading image", path) from None
    except Image.UnidentifiedImageError:
        raise CaptuneError("cannot decode image: not a recognised image format", path) from None
    except Image.DecompressionBombError as e:
        raise CaptuneError(f"image too large: {e}", path) from None
    except (OSError, SyntaxError, ValueError) as e:
        if "truncated" in str(e):
            raise CaptuneError("truncated image", path) from None
        raise CaptuneError(f"cannot decode image: {e}", path) from None


def blank_image(size: int) -> Image.Image:
    """A black square of one tile: a stand-in image whose content never matters."""
    return Image.new("RGB", (size, size))


def tile_grid(
    width: int, height: int, max_tiles: int = 6, min_tiles: int = 1, tile_size: int = 448
) -> tuple[int, int]:
    """The (cols, rows) grid InternVL2 chooses: the aspect ratio closest to width / height.

    On an exact tie, a later (larger) grid wins only if the image has more than half its pixels.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    aspect = width / height
    best, best_diff = (1, 1), math.inf
    for cols, rows in sorted(grids, key=lambda g: g[0] * g[1]):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, max_tiles: int = 6, tile_size: int = 448, thumbnail: bool = True,
                min_tiles: int = 1) -> int:
    """How many tiles `tile_image` makes of a `width` x `height` image, the thumbnail included."""
    cols, rows = tile_grid(width, height, max_tiles=max_tiles, min_tiles=min_tiles, tile_size=tile_size)
    return cols * rows + (1 if thumbnail and cols * rows > 1 else 0)


def _split(image: Image.Image, max_tiles: int, min_tiles: int, tile_size: int, thumbnail: bool) -> list[Image.Image]:
    """InternVL2's dynamic_preprocess: grid tiles row by row, then the thumbnail."""
    cols, rows = tile_grid(image.width, image.height, max_tiles, min_tiles, tile_size)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tile_pixels(
    image: Image.Image | str | Path,
    max_tiles: int = 6,
    tile_size: int = 448,
    thumbnail: bool = True,
    min_tiles: int = 1,
) -> torch.Tensor:
    """The tiles as uint8 `[n, 3, S, S]`, before normalisation: a quarter of the bytes to move between processes
    and to the GPU, where `normalize` finishes the job (the same float32 operations, so the same values)."""
    image = load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    tiles = _split(image, max_tiles, min_tiles, tile_size, thumbnail)
    resized = [t.resize((tile_size, tile_size), Image.Resampling.BICUBIC) for t in tiles]
    pixels = np.stack([np.asarray(t, dtype=np.uint8) for t in resized])  # [n, S, S, 3]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # [n, 3, S, S]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 tiles to InternVL2's input: float32 in [0, 1], then ImageNet mean/std (as torchvision's ToTensor and
    Normalize). Float tensors pass through unchanged."""
    if pixels.is_floating_point():
        return pixels
    x = pixels.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def tile_image(
    image: Image.Image | str | Path,
    max_tiles: int = 6,
    tile_size: int = 448,
    thumbnail: bool = True,
    min_tiles: int = 1,
) -> torch.Tensor:
    """Tile an image (PIL image of any mode, or a file path) as InternVL2 does: float32 [n, 3, S, S]."""
    return normalize(tile_pixels(image, max_tiles, tile_size, thumbnail, min_tiles)).contiguous()
