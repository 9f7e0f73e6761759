"""Stage 1 in one process or a pool of them; a worker keeps its models between tasks, so they load once per process."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from dist_train.extract.faces import Extractor
from dist_train.extract.job import Job
from dist_train.extract.models import Pack
from dist_train.extract.sources import Input

_WORKER: Extractor | None = None


def _init_worker(*args) -> None:
    global _WORKER
    _WORKER = Extractor(*args, pack=None)


def _run_task(root: Path, out: Path, inputs: list[Input]) -> None:
    _WORKER.run(root, out, inputs)


def run_stage1(job: Job, todo: list[Input], pack: Pack, progress) -> None:
    """Extract every input in ``todo`` into the cache, in a process pool when workers > 1."""
    global _WORKER
    images = [i for i in todo if i.kind == "image"]
    tasks = [images[i : i + job.batch_size] for i in range(0, len(images), job.batch_size)]
    tasks += [[i] for i in todo if i.kind == "video"]
    providers = list(job.providers)
    if job.workers == 1:
        _WORKER = Extractor(job.settings, providers, 0, job.batch_size, pack)
        for task in tasks:
            _run_task(job.root, job.out, task)
            progress.update(len(task))
        return
    threads = max(1, (os.cpu_count() or 1) // job.workers)
    spawn = multiprocessing.get_context("spawn")  # fresh onnxruntime/CUDA state per worker
    init = (job.settings, providers, threads, job.batch_size)
    with ProcessPoolExecutor(job.workers, mp_context=spawn, initializer=_init_worker, initargs=init) as pool:
        futures = {pool.submit(_run_task, job.root, job.out, task): len(task) for task in tasks}
        try:
            for future in as_completed(futures):
                future.result()
                progress.update(futures[future])
        except BaseException:  # Ctrl-C or a dead worker: stop now, finished inputs stay cached
            pool.shutdown(wait=False, cancel_futures=True)
            raise
