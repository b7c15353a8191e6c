"""`executor: {kind: ray}`: the K type fits of an EM iteration side by side, one Ray actor group per type.

The driver (the `openrlhf run` process) keeps everything that is state of the run: the
responsibilities, the checkpoints, run.json, the caches. What it hands to Ray is the work an EM
iteration can do in parallel:

- `fit_many`: job k runs on actor group k. A group is a DeepSpeed data-parallel group of
  `max(1, executor.gpus_per_type)` actors held by one placement group; every member runs
  `backend.fit` on the same inputs (OpenRLHF's strategy shards the batches) and rank 0's trained
  policy comes back. The policy object travels by pickle through the object store (LoRA adapter
  or full-model tensors for the `openrlhf` backend, the MLP for `bandit`: no backend-specific
  code here); the dataset is put in the object store once per dataset and cached in each actor.
  The driver updates each `job.policy` in place and records when each fit ran, measured inside
  the actor.
- `loglik_many`: E-step scoring, rows split into one contiguous shard per actor group, every
  shard scored under all K policies with `loglik_rows` (the same function the local executor
  uses) by all ranks of its group together (under several ranks the backend shares the rows out
  and gathers them, as under a launcher), concatenated in row order. Before the first fit there
  are no actors and the driver scores (the seeding step of `em_dpo`).

Each actor builds the run's PolicyBackend itself, from `recipe["model"]` with the runner's own
factory, on first use (the model may be `stage:sft`, produced by an earlier stage of this run).
Actors are created on the first `fit_many` and reused across EM iterations and stages; a later
call with more jobs adds groups.

Host machinery reused (openrlhf.trainer.ray.launcher): `BaseDistributedActor` sets each actor's
MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_RANK for the DeepSpeed rendezvous, and
`RayActorGroup` creates the ranks of a group inside a placement group. `TypeActorGroup` below is
the one place that adapts them; see its docstring.

Requirements on a real cluster: every node can import this package (the executor puts the
package's folder on the actors' PYTHONPATH, which is enough on one machine; on a cluster install
the plugin on every node) and reads the run directory at the same path (shared storage): actors
resolve `stage:NAME` models from run.json and read the reference-score cache there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.ref_cache import ReferenceCache
from ..data.schema import ComparisonSet
from ..errors import EmdpoError
from ..host.compat import apply_cpu_compat
from .base import ExecutorConfig, FitJob, loglik_rows

apply_cpu_compat()  # the host's launcher imports openrlhf.models, which needs the flash_attn stand-ins on CPU

import ray  # noqa: E402
from openrlhf.trainer.ray.launcher import BaseDistributedActor, RayActorGroup  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402

PLUGIN_ROOT = Path(__file__).resolve().parents[2]  # the folder holding emdpo_plugin/ and data_builders/
PLACEMENT_TIMEOUT_S = float(os.environ.get("EMDPO_RAY_PLACEMENT_TIMEOUT_S", "600"))


class TypeWorker(BaseDistributedActor):
    """One rank of a type's actor group: builds the run's backend on first use, then fits and scores.

    `BaseDistributedActor.__init__` (the host's) exports the rendezvous variables that
    `DeepspeedStrategy.setup_distributed` reads when the backend is built."""

    def __init__(self, world_size: int, rank: int, master_addr: str | None, master_port: int | None) -> None:
        super().__init__(world_size, rank, master_addr, master_port)
        self._backend: Any = None
        self._datasets: dict[str, ComparisonSet] = {}

    def configure(self, recipe: dict[str, Any], run_dir: str, threads: int) -> str:
        import torch

        self._recipe, self._run_dir = recipe, Path(run_dir)
        torch.set_num_threads(max(1, threads))
        return f"{self._get_current_node_ip()}:{os.getpid()}"

    def backend(self) -> Any:
        if self._backend is None:
            from ..backends.factory import default_backend_factory

            self._backend = default_backend_factory(self._recipe, self._run_dir)
        return self._backend

    def dataset(self, key: str, holder: list[Any]) -> ComparisonSet:
        """The dataset `key`, fetched from the object store once (`holder` wraps its ref so Ray
        does not resolve it on every call)."""
        if key not in self._datasets:
            self._datasets[key] = ray.get(holder[0])
        return self._datasets[key]

    def fit(self, policy: Any, key: str, holder: list[Any], weights: np.ndarray, warm: bool,
            desc: str, schedule: Any = None) -> tuple[Any, dict[str, Any], float, float]:
        backend, data = self.backend(), self.dataset(key, holder)
        _refresh_reference_cache(backend, data)
        start = time.time()
        stats = backend.fit(policy, data, np.array(weights), warm=warm, desc=desc, schedule=schedule)  # a writable copy (the store's is read-only)
        return (policy if self._rank == 0 else None), stats, start, time.time()  # rank 0's state is the result

    def release_engine(self) -> None:
        release = getattr(self._backend, "release_engine", None)
        if release is not None:
            release()

    def loglik(self, policies: list[Any], key: str, holder: list[Any], lo: int, hi: int,
               ref: np.ndarray) -> np.ndarray:
        data = self.dataset(key, holder)
        mask = np.zeros(len(data), dtype=bool)
        mask[lo:hi] = True
        return loglik_rows(self.backend(), policies, data.subset(mask), np.array(ref))


def _refresh_reference_cache(backend: Any, data: ComparisonSet) -> None:
    """Make an actor's backend re-read the on-disk reference cache when it lacks rows of `data`.

    The driver scores the reference for every dataset before shipping a fit (`fit_many`), so the
    cache file under the run directory is complete. An `openrlhf` backend loads that file once
    and would otherwise compute missing rows itself, in every actor at once, all writing the same
    file. (Backends without a `ref_cache` are left alone.)"""
    cache = getattr(backend, "ref_cache", None)
    if isinstance(cache, ReferenceCache):
        cache.reload_if_incomplete(data)


RemoteTypeWorker = ray.remote(TypeWorker)


class TypeActorGroup(RayActorGroup):
    """The host's `RayActorGroup` for one type: `world` ranks of `TypeWorker` in a placement group.

    Why a wrapper: the host's group is written for GPU actors. It reserves `num_cpus =
    num_gpus = num_gpus_per_actor` per actor and, when it makes its own placement group, asks
    for `{"GPU": 1, "CPU": 1}` bundles. So this class always builds the placement group itself
    (bundles of `cpus_per_type` CPUs, plus one GPU each when `gpus_per_type > 0`) and hands it
    to the host's constructor, which places rank r in bundle r and wires the rendezvous (rank 0
    picks MASTER_ADDR/PORT, the others receive them). CPU actors get `num_gpus_per_actor = 0`:
    they claim no resources themselves and run inside their bundle, which holds the CPUs.
    """

    def __init__(self, type_index: int, config: ExecutorConfig) -> None:
        world = max(1, config.gpus_per_type)
        nodes = config.num_nodes_per_type
        if world % nodes:
            raise EmdpoError(f"executor.gpus_per_type ({config.gpus_per_type}) must be a multiple of "
                             f"executor.num_nodes_per_type ({nodes})")
        gpu = config.gpus_per_type > 0
        bundle: dict[str, float] = {"CPU": max(1.0, config.cpus_per_type) if gpu else config.cpus_per_type}
        if gpu:
            bundle["GPU"] = 1
        self.type_index, self.world_size, self.name = type_index, world, f"type{type_index}"
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise EmdpoError(
                f"Ray executor: could not place the actor group of {self.name} ({world} x {bundle}) within "
                f"{PLACEMENT_TIMEOUT_S:.0f}s; the cluster has {_resources()} and every type needs its own group: "
                "lower executor.cpus_per_type / executor.gpus_per_type or add nodes") from None
        super().__init__(nodes, world // nodes, RemoteTypeWorker, pg=self.pg, num_gpus_per_actor=1 if gpu else 0)

    @property
    def actors(self) -> list[Any]:
        return self._actor_handlers

    def kill(self) -> None:
        for actor in self._actor_handlers:
            ray.kill(actor, no_restart=True)
        self._actor_handlers = []
        remove_placement_group(self.pg)


def _resources() -> str:
    total = ray.cluster_resources()
    return ", ".join(f"{total[k]:g} {k}" for k in ("CPU", "GPU") if k in total) or "no resources"


def _remote_error(exc: BaseException) -> str:
    """The remote exception's own text (not Ray's wrapper and traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _assign(dst: Any, src: Any) -> None:
    """Give the caller's policy object the trained state that came back from an actor."""
    if dst is src:
        return
    if hasattr(dst, "load_state_dict") and hasattr(src, "state_dict"):  # torch modules (bandit)
        dst.load_state_dict(src.state_dict())
    elif hasattr(dst, "__dict__"):  # plain objects (LMPolicy: its `state` tensors)
        dst.__dict__.update(vars(src))
    else:
        raise EmdpoError(f"Ray executor: cannot update a {type(dst).__name__} policy in place")



def _ray_temp_dir(run_dir: Path) -> str | None:
    """A temp folder for a local Ray when its default one (`$RAY_TMPDIR` or `/tmp` + `/ray`) would
    overlap the run folder (e.g. `--output-dir /tmp/ray`): Ray's session files must not land among
    the run's outputs. None keeps Ray's default."""
    default = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()).resolve() / "ray"
    if run_dir == default or default in run_dir.parents or run_dir in default.parents:
        return str(default.parent / f"ray-emdpo-{os.getuid()}")
    return None

class RayExecutor:
    """K fits at once on K Ray actor groups; E-step scoring sharded across the groups."""

    kind = "ray"

    def __init__(self, config: ExecutorConfig, recipe: dict[str, Any], run_dir: Any) -> None:
        self.config, self.recipe, self.run_dir = config, recipe, Path(run_dir).resolve()
        self.timeline: list[dict[str, Any]] = []
        self.groups: list[TypeActorGroup] = []
        self._datasets: dict[int, tuple[ComparisonSet, str, list[Any]]] = {}
        self._owns_ray = False
        if not ray.is_initialized():
            self._init_ray()
            self._owns_ray = True

    # --- Ray -------------------------------------------------------------------------------
    def _init_ray(self) -> None:
        cfg = self.config
        path = os.pathsep.join(p for p in (str(PLUGIN_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": path, "TQDM_DISABLE": "1"}}  # no progress bars from actors
        kwargs: dict[str, Any] = {"runtime_env": runtime_env, "include_dashboard": False,
                                  "logging_level": logging.WARNING}
        if cfg.address is None:  # a local Ray sized to this machine ("local": never join a running cluster)
            import torch

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs.update(address="local", num_cpus=len(os.sched_getaffinity(0)), num_gpus=torch.cuda.device_count())
            temp_dir = _ray_temp_dir(self.run_dir)
            if temp_dir is not None:
                kwargs["_temp_dir"] = temp_dir
            if cfg.object_store_mb is not None:
                kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
        else:
            kwargs["address"] = cfg.address
        try:
            with warnings.catch_warnings():  # Ray's notice about a future default for num_gpus=0 actors
                warnings.simplefilter("ignore", FutureWarning)
                ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises several types for a bad address
            where = f"the Ray cluster at {cfg.address!r}" if cfg.address else "a local Ray"
            raise EmdpoError(f"Ray executor: could not start {where}: {type(exc).__name__}: {exc}") from None

    def release_engines(self) -> None:
        """Every type actor destroys its training engine (a stage ended); the actors stay."""
        refs = [a.release_engine.remote() for group in self.groups for a in group.actors]
        self._gather(refs, [f"actor {i}" for i in range(len(refs))])

    def close(self) -> None:
        """Kill the actors and placement groups this executor made; stop Ray if it started it."""
        for group in self.groups:
            try:
                group.kill()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.groups.clear()
        self._datasets.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # --- actor groups ----------------------------------------------------------------------
    def _ensure_groups(self, n: int) -> None:
        new = []
        while len(self.groups) < n:
            self._check_capacity(len(self.groups) + 1)
            group = TypeActorGroup(len(self.groups), self.config)
            self.groups.append(group)
            new.append(group)
        threads = max(1, int(self.config.cpus_per_type))
        refs, labels = [], []
        for group in new:
            for rank, actor in enumerate(group.actors):
                refs.append(actor.configure.remote(self.recipe, str(self.run_dir), threads))
                labels.append(f"actor {group.name} rank {rank} (start-up)")
        self._gather(refs, labels)

    def _check_capacity(self, groups: int) -> None:
        """Fail at once, not after the placement timeout, when the cluster can never hold `groups` groups."""
        cfg = self.config
        world = max(1, cfg.gpus_per_type)
        need = {"CPU": groups * world * (max(1.0, cfg.cpus_per_type) if cfg.gpus_per_type else cfg.cpus_per_type)}
        if cfg.gpus_per_type:
            need["GPU"] = groups * world
        total = ray.cluster_resources()
        short = [k for k, v in need.items() if total.get(k, 0) + 1e-9 < v]
        if short and self.config.address is None:  # a cluster may autoscale; a local Ray cannot
            raise EmdpoError(
                f"Ray executor: {groups} types need {', '.join(f'{need[k]:g} {k}' for k in need)} "
                f"(executor.cpus_per_type={cfg.cpus_per_type:g}, gpus_per_type={cfg.gpus_per_type} per type) "
                f"but this machine's Ray has {_resources()}; lower executor.cpus_per_type "
                "(e.g. 0.5 to share a core between two types on CPU) or gpus_per_type")

    def _dataset(self, data: ComparisonSet) -> tuple[str, list[Any]]:
        """The dataset's object-store ref, put once per dataset object."""
        entry = self._datasets.get(id(data))
        if entry is None or entry[0] is not data:
            entry = (data, uuid.uuid4().hex, [ray.put(data)])  # holding `data` keeps its id unique
            self._datasets[id(data)] = entry
        return entry[1], entry[2]

    @staticmethod
    def _gather(refs: list[Any], labels: list[str]) -> list[Any]:
        """Results in order; the first failure (whichever finishes first) becomes one EmdpoError."""
        index = {ref: i for i, ref in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    out[index[ref]] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise EmdpoError(f"Ray executor: {labels[index[ref]]} failed: {_remote_error(exc)}") from None
        return out

    # --- the executor verbs ----------------------------------------------------------------
    def fit_many(self, backend: Any, data: ComparisonSet, jobs: list[FitJob]) -> list[dict[str, Any]]:
        if not jobs:
            return []
        backend.ref_score(data)  # complete the run's reference cache once, before K actors read it
        self._ensure_groups(len(jobs))
        key, holder = self._dataset(data)
        refs, labels = [], []
        for job, group in zip(jobs, self.groups):
            policy = ray.put(job.policy)
            weights = np.asarray(job.weights, dtype=np.float64)
            for rank, actor in enumerate(group.actors):
                refs.append(actor.fit.remote(policy, key, holder, weights, job.warm, job.desc, job.schedule))
                labels.append(f"{job.desc!r} on actor {group.name} rank {rank}")
        results = self._gather(refs, labels)
        stats, pos = [], 0
        for job, group in zip(jobs, self.groups):
            policy, fit_stats, start, end = results[pos]  # rank 0's result
            pos += group.world_size
            _assign(job.policy, policy)
            stats.append(fit_stats)
            self.timeline.append({"desc": job.desc, "start": start, "end": end, "worker": f"ray:{group.name}"})
        return stats

    def loglik_many(self, backend: Any, policies: list[Any], data: ComparisonSet, ref: np.ndarray) -> np.ndarray:
        if not self.groups or len(data) < 2:  # before the first fit no actor exists: score here
            return loglik_rows(backend, policies, data, ref)
        key, holder = self._dataset(data)
        shared = ray.put(list(policies))
        groups = self.groups[: len(data)]
        bounds = np.linspace(0, len(data), len(groups) + 1).astype(int)
        refs, labels, first = [], [], []
        for group, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            first.append(len(refs))
            for rank, actor in enumerate(group.actors):  # a group scores its shard together (data parallel)
                refs.append(actor.loglik.remote(shared, key, holder, int(lo), int(hi), ref[lo:hi]))
                labels.append(f"E-step scoring of rows {lo}-{hi} on actor {group.name} rank {rank}")
        results = self._gather(refs, labels)
        return np.concatenate([results[i] for i in first], axis=0)  # rank 0's shard of each group
