from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSIFICATION, SEGMENTATION = "classification", "segmentation"
IGNORE_INDEX = 255  # segmentation: pixels with this label count in no loss and no metric


def file_size(path, missing: str) -> int:
    """Size in bytes of a listed image (part of a manifest); a missing file raises with `missing`."""
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None


class Split:
    """A fixed, ordered list of labelled images. Subclasses implement ``__len__``, ``image``,
    ``label`` and ``manifest`` (a JSON-able description that changes whenever the content does).

    ``task``: ``"classification"`` (``label(i)`` is a class index) or ``"segmentation"``
    (``label(i)`` is a PIL mask, mode ``L``, the size of ``image(i)``: class indices
    0..num_classes-1, ``ignore_index`` for unlabelled pixels)."""

    name: str
    num_classes: int
    task: str = CLASSIFICATION
    ignore_index: int | None = None
    classes: list[str] | None = None  # class names in label order, where the dataset has them

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int):
        raise NotImplementedError

    def manifest(self) -> dict:
        raise NotImplementedError

    def image_path(self, i: int) -> Path | None:
        """The file image ``i`` is read from (None for datasets without files)."""
        return None

    def image_id(self, i: int) -> str:
        """A stable per-image id from the manifest: the image's path relative to the dataset root,
        or ``<source>:<index>`` for datasets without files."""
        return f"{self.name}:{i}"

    def where(self, i: int) -> str:
        """Image ``i`` for messages: its full path where it has one."""
        p = self.image_path(i)
        return str(p) if p is not None else f"image {self.image_id(i)} of split {self.name!r}"

    def image_ids(self) -> list[str]:
        return [self.image_id(i) for i in range(len(self))]


    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()

    def torch(self, transform, label_transform=None) -> "TransformedSplit":
        """A torch Dataset of (pixels, label, index). Segmentation splits need ``label_transform``
        (the image's geometry applied to the mask: ``data.segmentation.mask_transform``)."""
        return TransformedSplit(self, transform, label_transform)


class TransformedSplit:
    """A map-style dataset for ``torch.utils.data.DataLoader`` (``__len__`` / ``__getitem__``; a
    DataLoader needs no Dataset base class, and without it reading a split needs no torch)."""

    def __init__(self, split: Split, transform, label_transform=None):
        if getattr(split, "task", CLASSIFICATION) == SEGMENTATION and label_transform is None:
            raise ValueError(f"segmentation split {split.name!r}: its masks need a label_transform that "
                             "follows the image preprocessing (data.segmentation.mask_transform)")
        self.split, self.transform, self.label_transform = split, transform, label_transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            label = self.split.label(i)
            if self.label_transform is not None:
                label = self.label_transform(label)
            image = self.split.image(i)
        except Exception as e:  # name the file: the DataLoader re-raises this in the main process
            raise BadImage(f"{self.split.where(i)}: {e}") from e
        return self.transform(image), label, i


def slice_items(items: list, start: int, count: int | None, what: str) -> list:
    """items[start:start+count] with a clear error when the slice lies outside the list."""
    start = int(start or 0)
    count = len(items) - start if count is None else int(count)
    if start < 0 or count <= 0 or start + count > len(items):
        raise ValueError(f"{what}: start={start}, count={count} lies outside its {len(items)} images")
    return items[start:start + count]


def file_sha256(path) -> str:
    """sha256 of a small file (a list, a class file): part of a manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BadImage(OSError):
    """An image that cannot be decoded (truncated, not an image) or has no known 8-bit scale."""


def to_8bit(im: Image.Image, what) -> Image.Image:
    """High-bit-depth single-channel images -> mode L, scaled (not clipped) to 0..255.

    PIL's own ``convert("RGB")`` clips these (a 16-bit image becomes almost all white, a float
    image in 0..1 all black). Scales: ``I;16*`` (16-bit PNG/TIFF) 0..65535; ``I`` (32-bit int) the
    same when its values lie in 0..65535, else an error; ``F`` (float) 0..1 when its values lie
    there, else 0..255 when they lie there, else an error. Other modes are returned unchanged."""
    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return im
    a = np.asarray(im).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not np.isfinite(a).all():
        raise BadImage(f"{what}: float image has NaN or infinite values")
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = a / 257.0  # 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scaled = a
    else:
        raise BadImage(f"{what}: {mode} image with values {lo:g}..{hi:g} has no known scale to 8 bits "
                       f"({'expected 0..1 or 0..255' if mode == 'F' else 'expected 0..65535'}); convert it first")
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8), mode="L")


def load_image(path) -> Image.Image:
    """Decode an image fully (a truncated or corrupt file fails here, naming it), high bit depths
    scaled to 8 bits (``to_8bit``)."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_8bit(im, path) if im.mode in ("I", "F") or im.mode.startswith("I;16") else im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist") from None
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated, bad data
        raise BadImage(f"{str(path)!r}: {e}") from e
