"""Images in: decode (raw bytes, base64, data URLs) with limits checked before the pixels are
decoded, a content hash, and Qwen2-VL preprocessing (resize to multiples of 28 within the pixel
budget, rescale, normalize, cut into patches) computed as transformers' Qwen2VLImageProcessorPil
does, with Pillow and numpy only (torchvision does not load beside the CPU torch)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import xxhash

from ..engine.errors import InvalidRequestError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")      # what Pillow decodes here and clients send
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 40_000_000                        # before resizing: guards the decoder's memory
HASH_SEED = 0x696D616765                             # "image"
_TEXTUAL = re.compile(rb"^(data:|[A-Za-z0-9+/=\s]+$)")  # base64 or a data URL, not an image's own bytes


@dataclass(frozen=True)
class ProcessedImage:
    """An image checked and measured (what the prompt needs); its patches are made where the tower
    runs (ImageProcessor.patches): the encoded image crosses between stages, 1/8 of its patches' size."""

    data: bytes                 # the image as sent, encoded ("" for a PIL image given offline)
    grid: tuple[int, int, int]  # (t, h, w) in patches
    hash: str                   # content hash of the decoded RGB pixels (same image, same key)
    num_tokens: int             # embeddings it becomes (= <|image_pad|> tokens in the prompt)
    rgb: object = dc_field(default=None, compare=False, repr=False)    # the decoded PIL image, if at hand


def image_bytes(data: bytes | str, field: str = "image") -> bytes:
    """Raw bytes from bytes, base64 text or a data URL (data:image/png;base64,...)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if not _TEXTUAL.match(raw[:64]):       # image bytes (PNG, JPEG... start with binary magic)
            return raw
        data = raw.decode("ascii", "replace")  # base64 or a data URL sent as bytes (Triton's BYTES, HTTP JSON)
    if not isinstance(data, str):
        raise InvalidRequestError(field, f"expected bytes, base64 text or a data URL, got {type(data).__name__}")
    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequestError(field, "a data URL must be base64-encoded (data:image/...;base64,...)")
    elif text.startswith(("http://", "https://", "file:")):
        raise InvalidRequestError(field, "image URLs are not fetched; send the image as a base64 data URL")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequestError(field, f"image is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(field, "not valid base64") from None


def decode_image(raw: bytes, field: str = "image"):  # noqa: ANN201 - returns PIL.Image.Image (RGB)
    """Decoded RGB image. The header is read first so a huge image is refused before decoding; alpha
    is composited onto white (as transformers' convert_to_rgb)."""
    from PIL import Image

    if not raw:
        raise InvalidRequestError(field, "empty image")
    if len(raw) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(field, f"image is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=list(FORMATS))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(field, f"image of {w}x{h} pixels is over the limit of {MAX_IMAGE_PIXELS}")
            img.load()
    except InvalidRequestError:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidRequestError(field, f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InvalidRequestError(field, f"corrupt or truncated image ({e})") from None
    return _rgb(img)


def _rgb(img):  # noqa: ANN001, ANN202 - PIL images
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequestError("image", f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class ImageProcessor:
    """A model's preprocessor_config.json, applied to decoded images."""

    def __init__(self, cfg: dict) -> None:
        self.patch = int(cfg.get("patch_size", 14))
        self.temporal = int(cfg.get("temporal_patch_size", 2))
        self.merge = int(cfg.get("merge_size", 2))
        size = cfg.get("size") or {}
        self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        self.resample = int(cfg.get("resample", 3))                 # PIL bicubic
        self.scale = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = np.asarray(cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), dtype=np.float32)
        self.std = np.asarray(cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711]), dtype=np.float32)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ImageProcessor:
        path = Path(model_dir) / "preprocessor_config.json"
        return cls(json.loads(path.read_text()) if path.is_file() else {})

    def __call__(self, data: object, field: str = "image") -> ProcessedImage:
        """data: encoded image bytes, base64 text, a data URL, or a PIL image (the offline API).
        Decoded (so a bad image is refused here), hashed and measured; no patches yet."""
        raw = b""
        if hasattr(data, "getbands"):
            img = _rgb(data)
        else:
            raw = image_bytes(data, field)  # type: ignore[arg-type]
            img = decode_image(raw, field)
        rgb = np.asarray(img)                                        # [H, W, 3] uint8
        digest = xxhash.xxh3_128(seed=HASH_SEED)
        digest.update(np.asarray(rgb.shape, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(rgb).tobytes())
        h, w = self._size(img)
        gh, gw, m = h // self.patch, w // self.patch, self.merge
        return ProcessedImage(raw, (1, gh, gw), digest.hexdigest(), gh * gw // (m * m), img)

    def _size(self, img) -> tuple[int, int]:  # noqa: ANN001 - a PIL image
        factor = self.patch * self.merge
        return smart_resize(img.height, img.width, factor, self.min_pixels, self.max_pixels)

    def patches(self, image: ProcessedImage) -> np.ndarray:
        """[t*h*w, C*T*P*P] float32: resized to its grid, rescaled, normalized, cut into patches."""
        img = image.rgb if image.rgb is not None else decode_image(image.data)
        h, w = self._size(img)
        if (1, h // self.patch, w // self.patch) != tuple(image.grid):
            raise InvalidRequestError("image", f"its size gives grid {(1, h // self.patch, w // self.patch)}, "
                                      f"not {tuple(image.grid)}")
        resized = np.asarray(img.resize((w, h), resample=self.resample))
        x = (resized.astype(np.float64) * self.scale).astype(np.float32)
        x = ((x - self.mean) / self.std).transpose(2, 0, 1)          # [C, H, W]
        gh, gw, m, p = h // self.patch, w // self.patch, self.merge, self.patch
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)   # (gh, gw, mh, mw, C, ph, pw)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], self.temporal, p, p))  # a still image: T copies
        return np.ascontiguousarray(x).reshape(gh * gw, 3 * self.temporal * p * p)
