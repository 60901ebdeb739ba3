"""Batch runs on many machines with Ray: one worker per machine, chunks handed out as workers free up,
and one writer (the driver, `streamer batch --ray`), or a Ray Data callable class (`Generate`).

Each worker is a Ray actor pinned to its node that holds one Engine and claims all the node's CPUs, since
one pass over the weights serves its whole batch: two workers on a machine would each read the weights. It
opens the model at the path it was given (`~` expanded on that machine) and checks the manifest's sha256
against the driver's, so a node with a missing or different model fails the job by name before any work.

The driver splits the requests still to do into chunks and keeps one chunk running on each worker. A chunk
returns whole, so a worker killed mid-chunk loses nothing: Ray restarts the actor (max_restarts) and the
chunk is run again by whichever worker is free first. Results are appended and fsynced by the driver to the
one results file (batch.ResultLog), so a killed driver resumes on rerun as a local run does.
"""
from __future__ import annotations

import logging
import os
import socket
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

from .errors import StreamerError

log = logging.getLogger(__name__)
RETRIES = 3  # runs of one chunk on workers that died under it, before its requests get error records
START_TIMEOUT = 300  # seconds for every worker to be placed and open the model


def _ray():
    try:
        import ray
    except ImportError:
        raise StreamerError("--ray needs Ray: pip install 'streamer[ray]' (or pip install 'ray[data]')") from None
    return ray


class Worker:
    """One machine's Engine (made a Ray actor by run_batch)."""

    def __init__(self, model: str, sha256: str, engine_options: dict):
        from ray.util import get_node_ip_address

        from .engine import Engine
        self.where = f"node {get_node_ip_address()} ({socket.gethostname()})"
        self.error = None  # why this machine cannot run the job, told to the driver by ready()
        path = Path(model).expanduser()
        try:
            self.engine = Engine(path, **engine_options)
        except StreamerError as e:
            self.error = f"{self.where}: {e}"
            return
        mine = self.engine.files.manifest_sha256
        if mine != sha256:
            self.error = (f"{self.where}: {path} holds another model (manifest sha256 {mine[:12]}…, the driver's is "
                          f"{sha256[:12]}…); every machine needs the same split model at that path")

    def ready(self) -> tuple[str, int, str | None]:
        return self.where, os.getpid(), self.error

    def run(self, requests: list[dict], options: dict) -> tuple[list[dict], dict]:
        totals: dict = {}
        return list(self.engine.batch(requests, totals=totals, **options)), totals


def start_workers(address: str, model: str, sha256: str, engine_options: dict) -> list:
    """One worker actor on every alive node, each holding its node's CPUs; raises naming a node that cannot
    open the model."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise StreamerError(f"--ray {address}: no Ray cluster to join ({str(e).strip().splitlines()[0]}); start "
                                "one with `ray start --head`") from None
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise StreamerError(f"the Ray cluster at {address} has no node with a CPU")
    remote = ray.remote(Worker)
    workers = [remote.options(num_cpus=n["Resources"]["CPU"], max_restarts=-1, max_task_retries=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(model, sha256, engine_options) for n in nodes]
    try:
        answers = ray.get([w.ready.remote() for w in workers], timeout=START_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        answers = [("", 0, f"the workers did not all start within {START_TIMEOUT} s: each needs all of its node's CPUs "
                           "free (`ray status` shows what holds them)")]
    except ray.exceptions.RayActorError as e:
        answers = [("", 0, f"a worker could not start: {type(e).__name__}: {str(e).strip().splitlines()[0]}")]
    errors = [error for _, _, error in answers if error]
    if errors:
        for w in workers:
            ray.kill(w)
        raise StreamerError("; ".join(errors))
    return workers


def run_batch(address: str, model: str, sha256: str, requests: Iterable[dict], engine_options: dict,
              options: dict, chunk: int, totals: dict) -> Iterator[dict]:
    """Yield the result records of `requests` (dicts with ids, as Engine.batch takes them) run on every node
    of the cluster, as their chunks come back; `totals` sums the workers' totals."""
    ray = _ray()
    requests = list(requests)
    pending = deque((0, requests[i:i + chunk]) for i in range(0, len(requests), chunk))
    if not pending:
        return
    workers = start_workers(address, model, sha256, engine_options)
    idle, running, pinging = list(range(len(workers))), {}, {}
    try:
        while pending or running:
            while pending and idle:
                i = idle.pop()
                tries, part = pending.popleft()
                running[workers[i].run.remote(part, options)] = (i, tries, part)
            if not running and not pinging:
                raise StreamerError("every Ray worker died; rerun to resume")
            done, _ = ray.wait(list(running) + list(pinging), num_returns=1)
            ref = done[0]
            if ref in pinging:  # a restarted worker answered, or is gone for good
                i = pinging.pop(ref)
                try:
                    where, _, error = ray.get(ref)
                except ray.exceptions.RayActorError:
                    where, error = f"Ray worker {i}", "it is gone"
                if error:
                    log.warning(f"{where}: {error}; going on with the other workers")
                else:
                    idle.append(i)
                continue
            i, tries, part = running.pop(ref)
            try:
                records, got = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the job's own error (a budget too small, say): stop, by name
                cause = getattr(e, "cause", None)
                raise StreamerError(str(cause) if isinstance(cause, StreamerError) else
                                    f"Ray worker {i}: {str(e).strip().splitlines()[-1]}") from None
            except ray.exceptions.RayActorError as e:
                log.warning(f"Ray worker {i} died with {len(part)} requests ({type(e).__name__}); they run again")
                if tries + 1 < RETRIES:
                    pending.appendleft((tries + 1, part))
                else:
                    for r in part:
                        yield {"id": r["id"], "error": f"the Ray workers running it died {RETRIES} times"}
                pinging[workers[i].ready.remote()] = i
                continue
            idle.append(i)
            for k, v in got.items():  # counts add up; a batch size is each worker's own: the largest is shown
                totals[k] = max(totals.get(k, 0), v) if k == "batch_size" else totals.get(k, 0) + v
            yield from records
    finally:
        for w in workers:
            ray.kill(w)


class Generate:
    """A Ray Data `map_batches` callable class: one Engine per actor, each batch of rows run through
    Engine.batch. Rows carry prompt, messages or prompt_ids (and optionally the per-request options of a batch
    line); the output has, per row, id (when the input has one), text, tokens, finish_reason, usage and error.

        ds.map_batches(streamer.ray.Generate, fn_constructor_kwargs={"model": "/data/llama3-8b-layers",
                       "max_new_tokens": 128}, concurrency=10, batch_size=256)
    """

    def __init__(self, model: str, memory_budget: str | int | None = None, dtype: str = "auto",
                 max_seq_len: int | None = None, **options):
        from .engine import Engine
        self.engine = Engine(Path(model).expanduser(), memory_budget, dtype, max_seq_len=max_seq_len)
        self.options = options

    def __call__(self, batch: dict):
        import pandas as pd
        rows = [dict(zip(batch, values)) for values in zip(*(_plain(v) for v in batch.values()))]
        requests = [{**{k: v for k, v in row.items() if k != "id"}, "id": i} for i, row in enumerate(rows)]
        got = {r["id"]: r for r in self.engine.batch(requests, **self.options)}
        out = [got[i] for i in range(len(rows))]
        columns = {"text": [r.get("text") for r in out], "tokens": [r.get("tokens", []) for r in out],
                   "finish_reason": [r.get("finish_reason") for r in out],
                   "usage": [r.get("usage", {"prompt_tokens": 0, "completion_tokens": 0}) for r in out],
                   "error": [r.get("error") for r in out]}
        if "id" in batch:
            columns = {"id": [row["id"] for row in rows], **columns}
        return pd.DataFrame(columns)


def _plain(column) -> list:
    """A Ray Data column (numpy array, pandas series or list) as plain Python values."""
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    return [v.tolist() if hasattr(v, "tolist") else v for v in values]
