"""Input files: the identity is the folder name under ROOT, and images and videos both come out as frames."""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dist_train.extract.job import ExtractError, Settings

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})


@dataclass(frozen=True)
class Input:
    rel: str  # path relative to ROOT, "/"-separated
    identity: str
    kind: str  # "image" or "video"


class ImageTooLarge(Exception):
    """An image over ``Settings.max_pixels``, known from its header: counted as ``too_large``, never decoded."""


def _not_regular(path: Path) -> str:
    """What a path that is neither a directory nor a regular file is (a FIFO would block whoever opens it)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symlink" if path.is_symlink() else "gone"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))
    return next((name for test, name in kinds if test(mode)), "a device or other special file")


def files_below(root: Path, by_identity: bool, folder: str = "identity"):
    """Every file below ``root`` in sorted order: ``(rel, identity, ext)``, or a problem dict: for anything but a
    regular file (FIFO, device, socket, broken symlink: never opened) and, with ``by_identity``, for a file directly
    in ROOT (a file's identity is its top folder's name). Extract and frontalize walk their trees with it."""
    for path in sorted(p for p in root.rglob("*") if not p.is_dir()):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/")[0]
        if not path.is_file():
            yield {"input": rel, "reason": "unsupported_file", "detail": f"not a regular file: {_not_regular(path)}"}
        elif by_identity and top == rel:
            yield {"input": rel, "reason": "outside_identity", "detail": f"not in ROOT/<{folder}>/"}
        else:
            yield rel, top if by_identity else "", path.suffix.lower()


def discover(root: Path, aligned: bool) -> tuple[list[Input], list[str], list[dict]]:
    """Inputs under ``ROOT/<identity>/**``, identity names, and the files that are not inputs."""
    inputs, problems = [], []
    names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    for found in files_below(root, by_identity=True):
        if isinstance(found, dict):
            problems.append(found)
            continue
        rel, identity, ext = found
        if ext in IMAGE_EXTS:
            inputs.append(Input(rel, identity, "image"))
        elif ext in VIDEO_EXTS and not aligned:
            inputs.append(Input(rel, identity, "video"))
        else:
            why = "a video, but --aligned takes 112x112 crops" if ext in VIDEO_EXTS else f"extension {ext!r}"
            problems.append({"input": rel, "reason": "unsupported_file", "detail": why})
    if not inputs:
        raise ExtractError(
            f"{str(root)!r} holds no images or videos in identity folders; expected ROOT/<identity>/**/*.jpg|png|... "
            f"and ROOT/<identity>/*.mp4|avi|... (images: {sorted(IMAGE_EXTS)}; videos: {sorted(VIDEO_EXTS)})"
        )
    return inputs, names, problems


def header_pixel_limit() -> int | None:
    """The most pixels an image may have for Pillow to read its header (larger: a decompression bomb to it)."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _image_size(f, max_pixels: int) -> tuple[int, int]:
    """(width, height) from an image file's header; Pillow reads it without decoding the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(f) as im:
                return im.size
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"over --max-pixels {max_pixels}; Pillow: {e}") from None
        except Exception as e:  # UnidentifiedImageError, or whatever a garbled header makes Pillow raise
            raise OSError(f"not an image whose size can be read ({type(e).__name__}: {e})") from None


def _jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG reaches its end-of-image marker; OpenCV decodes a cut one as a partly grey image, silently.

    Segments before the first scan are skipped by their lengths (an EXIF thumbnail holds a marker of its own);
    inside scan data a 0xFF byte is always followed by 0x00 or a marker, so the next FF D9 ends the image.
    """
    i = 2  # after SOI
    while 0 <= i < len(data) - 3:
        if data[i] != 0xFF:  # bytes between segments: decoders skip to the next marker
            i = data.find(b"\xff", i)
            continue
        marker = data[i + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without a length
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i + 2 + length) >= 0
        i += 2 + length
    return False


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """A BGR image, read once; ``ImageTooLarge`` over ``max_pixels`` (from the header, before decoding), OSError
    when it is not a regular file (opened without blocking: a FIFO put there is not waited on), cut short or does
    not decode."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {_not_regular(path)}")
        width, height = _image_size(f, max_pixels)
        if width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, over --max-pixels {max_pixels}")
        f.seek(0)
        data = f.read()
    if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
        raise OSError("the JPEG is cut short (no end-of-image marker): the rest would decode as grey")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # EXIF orientation applied, as by imread
    if img is None:
        raise OSError("OpenCV cannot decode this image")
    return img


def read_frames(path: Path, kind: str, settings: Settings):
    """Yield (frame_index, BGR image or None if that frame does not decode); OSError when none decodes,
    ``ImageTooLarge`` for an image over ``settings.max_pixels``."""
    if kind == "image":
        yield 0, read_image(path, settings.max_pixels)
        return
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise OSError("OpenCV cannot open this video")
        fps = cap.get(cv2.CAP_PROP_FPS)
        step = settings.every or (max(1, round(fps / settings.fps)) if fps > 0 else 1)
        index, decoded = 0, 0
        while cap.grab():
            if index % step == 0:
                ok, frame = cap.retrieve()
                decoded += ok and frame is not None
                yield index, frame if ok else None
            index += 1
        if decoded == 0:
            raise OSError("no decodable frames in this video")
    finally:
        cap.release()
