"""`dist-train extract`: face images and videos -> InsightFace features -> a shard set of profile->frontal pairs.

Two stages, so that the slow part runs once: stage 1 (``stage1.py``: slow, parallel,
resumable) runs the model pack over each input and caches every face found in
``OUT/.cache`` (``cache.py``); stage 2 (``stage2.py``: fast) filters, pairs
(``pairing.py``), splits by identity (``data/splits.py``) and writes the
shards from that cache alone, re-run in full each time, so changing a filter or
threshold needs no re-extraction.
"""

from dist_train.extract.cache import (
    CACHE_DIR,
    CHUNK_META,
    FACE_ARRAYS,
    SETTINGS_NAME,
    CacheRows,
    Result,
    check_cache_settings,
    load_records,
    scan_cache,
    write_chunk,
)
from dist_train.extract.cli import build_parser, main
from dist_train.extract.faces import Extractor
from dist_train.extract.job import ExtractError, Job, Settings
from dist_train.extract.models import ALIGNED_SIZE, BUFFALO_L, Pack, choose_providers, load_pack
from dist_train.extract.sources import IMAGE_EXTS, VIDEO_EXTS, Input, discover, read_frames
from dist_train.extract.stage1 import run_stage1
from dist_train.extract.stage2 import (
    DROP_UNITS,
    LIGHT_ARRAYS,
    PAIR_FIELDS,
    REPORT_NAME,
    filtered_inputs,
    run_stage2,
    scan_faces,
)
from dist_train.extract.store import STORE_PREFIX, FaceStore, write_pairs

# GATHER_ROWS is not re-exported: a tuning constant is set on its module, dist_train.extract.store.
__all__ = [
    "ALIGNED_SIZE",
    "BUFFALO_L",
    "CACHE_DIR",
    "CHUNK_META",
    "DROP_UNITS",
    "FACE_ARRAYS",
    "IMAGE_EXTS",
    "LIGHT_ARRAYS",
    "PAIR_FIELDS",
    "REPORT_NAME",
    "SETTINGS_NAME",
    "STORE_PREFIX",
    "VIDEO_EXTS",
    "CacheRows",
    "ExtractError",
    "Extractor",
    "FaceStore",
    "Input",
    "Job",
    "Pack",
    "Result",
    "Settings",
    "build_parser",
    "check_cache_settings",
    "choose_providers",
    "discover",
    "filtered_inputs",
    "load_pack",
    "load_records",
    "main",
    "read_frames",
    "run_stage1",
    "run_stage2",
    "scan_cache",
    "scan_faces",
    "write_chunk",
    "write_pairs",
]
