"""Input files: the identity is the folder name under ROOT, and images and videos both come out as frames."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2

from dist_train.extract.job import ExtractError, Settings

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})


@dataclass(frozen=True)
class Input:
    rel: str  # path relative to ROOT, "/"-separated
    identity: str
    kind: str  # "image" or "video"


def files_below(root: Path, by_identity: bool, folder: str = "identity"):
    """Every file below ``root`` in sorted order: ``(rel, identity, ext)``, or, with ``by_identity``, a problem
    dict for a file directly in ROOT (a file's identity is its top folder's name). Extract and frontalize walk
    their trees with it."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/")[0]
        if by_identity and top == rel:
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


def read_frames(path: Path, kind: str, settings: Settings):
    """Yield (frame_index, BGR image or None if that frame does not decode); OSError when none decodes."""
    if kind == "image":
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError("OpenCV cannot decode this image")
        yield 0, img
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
