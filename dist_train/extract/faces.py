"""Faces of one image or frame through insightface's own model code, so that extract and frontalize see the same faces."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dist_train.extract.cache import Result, _stamp, write_chunk
from dist_train.extract.job import Settings
from dist_train.extract.models import ALIGNED_SIZE, Pack, load_pack
from dist_train.extract.sources import ImageTooLarge, Input, read_frames


class Extractor:
    """One process's models; turns input files into cached face records."""

    def __init__(self, settings: Settings, providers: list[str], threads: int, batch_size: int, pack: Pack | None):
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.")
        self.settings = settings
        self.pack = pack or load_pack(settings.pack, providers, threads)
        ctx = 0 if providers[0] == "CUDAExecutionProvider" else -1
        self.pack.detector.prepare(
            ctx, input_size=(settings.det_size, settings.det_size), det_thresh=settings.det_thresh
        )
        self.pack.landmark.prepare(ctx)
        self.pack.recognition.prepare(ctx)
        fixed = self.pack.recognition.input_shape[0]
        self.batch_size = 1 if fixed == 1 else batch_size

    def _faces_in(self, img: np.ndarray):
        """insightface Face objects with bbox, kps, det_score, landmark_3d_68 and pose."""
        # lazy, as in models.load_pack: importing insightface takes 0.9-1.8 s
        from insightface.app.common import Face
        from insightface.utils.face_align import arcface_dst

        if self.settings.aligned:
            faces = [
                Face(bbox=np.array([0, 0, ALIGNED_SIZE, ALIGNED_SIZE], np.float32), kps=arcface_dst, det_score=1.0)
            ]
        else:
            boxes, kpss = self.pack.detector.detect(img)
            faces = [Face(bbox=b[:4], kps=k, det_score=b[4]) for b, k in zip(boxes, kpss)]
        for face in faces:
            self.pack.landmark.get(img, face)  # sets landmark_3d_68 and pose, insightface's own code
        return faces

    def _embed(self, crops: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(crops), self.batch_size):
            out.append(self.pack.recognition.get_feat(crops[i : i + self.batch_size]))
        emb = np.concatenate(out).astype(np.float64)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)  # face.normed_embedding

    def _extract_one(self, root: Path, inp: Input, crops: list[np.ndarray]) -> Result:
        """Detect and landmark every face of one input; appends their aligned crops to ``crops``."""
        from insightface.utils.face_align import norm_crop  # lazy, as in _faces_in

        path = root / inp.rel
        result = Result(inp, _stamp(path))  # stamped before reading: a file changed meanwhile is redone
        n_crops = len(crops)
        try:
            for index, img in read_frames(path, inp.kind, self.settings):
                result.frames += 1
                if img is None:
                    result.bad_frames += 1
                    continue
                if self.settings.aligned and img.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
                    result.status = "wrong_size"
                    result.detail = f"--aligned needs 112x112 crops, this is {img.shape[1]}x{img.shape[0]}"
                    break
                found = self._faces_in(img)
                result.no_face += not found
                for face in found:
                    crops.append(norm_crop(img, face.kps, image_size=ALIGNED_SIZE))
                    result.faces.append(
                        {
                            "kps": face.landmark_3d_68,
                            "pose": face.pose,
                            "bbox": face.bbox,
                            "score": face.det_score,
                            "frame": index,
                        }
                    )
        except ImageTooLarge as e:
            result.status, result.detail = "too_large", str(e)
        except OSError as e:
            result.status, result.detail = "unreadable", str(e)
        except Exception as e:  # one bad input must not stop a run of millions
            result.status, result.detail = "failed", f"{type(e).__name__}: {e}"
        if result.status != "ok":
            del crops[n_crops:]
            result.faces = []
        return result

    def extract(self, root: Path, inputs: list[Input]) -> list[Result]:
        """Every face of a batch of inputs (``ROOT/input.rel``), recognition batched across them.

        Each face dict holds FACE_ARRAYS' fields but "owner": ``emb`` (face.normed_embedding),
        ``kps`` (landmark_3d_68), ``pose``, ``bbox``, ``score``, ``frame``. Shared with ``dist-train frontalize``.
        """
        crops: list[np.ndarray] = []
        results = [self._extract_one(root, inp, crops) for inp in inputs]
        if crops:
            emb = iter(self._embed(crops))
            for result in results:
                for face in result.faces:
                    face["emb"] = next(emb)
        return results

    def run(self, root: Path, out: Path, inputs: list[Input]) -> None:
        """Extract a batch of inputs into one cache chunk."""
        write_chunk(out, self.extract(root, inputs))
