"""What one extract command asks for, in values every stage and every worker process can share (and pickle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dist_train.extract import pairing


class ExtractError(ValueError):
    """Bad input or model pack; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Settings:
    """Everything that changes what stage 1 computes; a cache is only valid for the same settings."""

    pack: str
    aligned: bool = False
    det_size: int = 640
    det_thresh: float = 0.3
    every: int | None = None  # video: every k-th frame, or ...
    fps: float | None = 2.0  # ... frames per second of video time
    max_pixels: int = 40_000_000  # images over this (width x height, from the header) are too_large, never decoded

    def fingerprint(self) -> dict:
        files = {p.name: p.stat().st_size for p in sorted(Path(self.pack).glob("*.onnx"))}
        return {**asdict(self), "pack": str(Path(self.pack).resolve()), "pack_files": files}


@dataclass(frozen=True)
class Job:
    """One extract command: where, with which models, and the stage 2 rules."""

    root: Path
    out: Path
    settings: Settings
    face_filter: pairing.FaceFilter
    rules: pairing.PairingRules
    providers: tuple[str, ...]
    workers: int = 1
    batch_size: int = 32
