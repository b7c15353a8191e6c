"""Runs under torchrun, the DeepSpeed launcher or any launcher that sets RANK/WORLD_SIZE.

Rank 0 is the driver: it runs every stage (data, clustering, E-step math, the min-max game,
reports) and alone writes run.json, checkpoints, caches, adapters and reports. The other ranks
run :func:`worker_loop`: they build the same PolicyBackend and then execute each backend verb
that rank 0 calls (`MIRRORED`) at the same time, so training is data parallel through
OpenRLHF's strategy, and the backend shards its scoring and sampling across ranks and gathers
the results (`shard` / `gather`). Rank 0 sends each call over a gloo control group; policies
and datasets cross the wire once and are referred to by id after that.

Why a driver rather than every rank running every stage: stages then need no rank guards at
all, no two ranks can write one path, and a stage added by a plugin is launcher-safe as long
as it talks to the model through the backend.
"""

from __future__ import annotations

import functools
import os
import weakref
from datetime import timedelta
from typing import Any, Callable

from .errors import EmdpoError

MIRRORED = ("new_policy", "fit", "score", "ref_score", "ref_features", "sample", "load", "release_engine")
_CONTROL: Any = None  # the gloo group rank 0 broadcasts calls over


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise EmdpoError(f"environment variable {name}={os.environ[name]!r}: expected an integer") from None


def world_size() -> int:
    """Processes in this run, as the launcher set them (1 without a launcher)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank()
    return _env_int("RANK", 0)


def is_driver() -> bool:
    return rank() == 0


def launched() -> bool:
    """True under a launcher with more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "ROLE_NAME")


def single_process_env() -> dict[str, str]:
    """This process's environment for a child that runs on its own: without a launcher's
    variables, or the MASTER_PORT of a process group this process already holds (the child
    would wait on torchrun's store, or fail to bind the port)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}


def init_distributed() -> None:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU) and make the control group.

    OpenRLHF's `setup_distributed` later finds the group initialised and reuses it. The control
    group has a long timeout: workers wait in it while rank 0 builds data or clusters.
    """
    global _CONTROL
    if not launched() or _CONTROL is not None:
        return
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        td.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                              timeout=timedelta(minutes=_env_int("EMDPO_NCCL_TIMEOUT_MIN", 60)))
    _CONTROL = td.new_group(backend="gloo", timeout=timedelta(hours=24))


def _broadcast(msg: Any = None) -> Any:
    import torch.distributed as td

    box = [msg]
    td.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def shard(items: list[Any]) -> tuple[list[int], list[Any]]:
    """This rank's share of `items` (strided, so length-sorted work stays balanced): (indices, items)."""
    n, r = world_size(), rank()
    if n == 1:
        return list(range(len(items))), items
    idx = list(range(r, len(items), n))
    return idx, [items[i] for i in idx]


def gather(indices: list[int], values: list[Any], total: int) -> list[Any]:
    """Inverse of :func:`shard` on every rank: the full list in the original order."""
    if world_size() == 1:
        return values
    import torch.distributed as td

    parts: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(parts, (indices, values))
    out: list[Any] = [None] * total
    for idx, vals in parts:
        for i, v in zip(idx, vals):
            out[i] = v
    return out


class _Ref:
    """Stands for an object the workers already hold (a policy or a dataset)."""

    __slots__ = ("id",)

    def __init__(self, oid: int) -> None:
        self.id = oid


class DriverBackend:
    """Rank 0's view of the backend: mirrored verbs run on every rank, everything else locally.

    `DriverBackend(local)` is an instance of a subclass that also defines, as forwarding
    properties, the members of every protocol in backends/base.py that `local` satisfies. Why:
    `isinstance(backend, SupportsX)` must see the wrapped backend's capabilities, and Python
    3.12+ checks protocols with `inspect.getattr_static`, which `__getattr__` does not answer.
    """

    def __new__(cls, local: Any) -> DriverBackend:
        from .backends.base import CAPABILITIES, PolicyBackend

        satisfied = tuple(p for p in (PolicyBackend, *CAPABILITIES) if isinstance(local, p))
        return super().__new__(_driver_class(cls, satisfied))

    def __init__(self, local: Any) -> None:
        self._local = local
        self._ids: dict[int, tuple[weakref.ref, int]] = {}  # id(obj) -> (weakref, wire id)
        self._next = 0
        self._freed: list[int] = []
        self._policy_types: set[type] = set()  # whatever new_policy/load return

    def __getattr__(self, name: str) -> Any:  # beta, stats, save, base_model, sample_vllm, ...
        return getattr(self._local, name)

    def _register(self, obj: Any) -> int:
        self._next += 1
        oid = self._next
        self._ids[id(obj)] = (weakref.ref(obj), oid)
        weakref.finalize(obj, self._forget, id(obj), oid)
        return oid

    def _forget(self, key: int, oid: int) -> None:
        if self._ids.get(key, (None, None))[1] == oid:
            del self._ids[key]
        self._freed.append(oid)

    def _encode(self, value: Any, new: dict[int, Any]) -> Any:
        from .data.schema import ComparisonSet

        if not (isinstance(value, ComparisonSet) or type(value) in self._policy_types):
            return value
        known = self._ids.get(id(value))
        if known is not None and known[0]() is value:
            return _Ref(known[1])
        oid = self._register(value)
        new[oid] = value  # sent in full once
        return _Ref(oid)

    def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        new: dict[int, Any] = {}
        wire_args = [self._encode(a, new) for a in args]
        wire_kwargs = {k: self._encode(v, new) for k, v in kwargs.items()}
        freed, self._freed = self._freed, []
        result_id = self._next + 1 if verb in ("new_policy", "load") else None
        if result_id is not None:
            self._next += 1
        _broadcast(("call", verb, wire_args, wire_kwargs, new, freed, result_id))
        result = getattr(self._local, verb)(*args, **kwargs)
        if result_id is not None:
            self._policy_types.add(type(result))
            self._ids[id(result)] = (weakref.ref(result), result_id)
            weakref.finalize(result, self._forget, id(result), result_id)
        return result

    def new_policy(self, *a: Any, **k: Any) -> Any:
        return self._call("new_policy", *a, **k)

    def fit(self, *a: Any, **k: Any) -> Any:
        return self._call("fit", *a, **k)

    def score(self, *a: Any, **k: Any) -> Any:
        return self._call("score", *a, **k)

    def ref_score(self, *a: Any, **k: Any) -> Any:
        return self._call("ref_score", *a, **k)

    def sample(self, *a: Any, **k: Any) -> Any:
        return self._call("sample", *a, **k)

    def load(self, *a: Any, **k: Any) -> Any:
        return self._call("load", *a, **k)

    def release_engine(self) -> None:  # every rank destroys its engine together (the next stage builds new ones)
        if hasattr(self._local, "release_engine"):
            self._call("release_engine")


@functools.lru_cache(maxsize=None)
def _driver_class(base: type, protocols: tuple[type, ...]) -> type:
    """`base` plus a forwarding property for each member of `protocols` that it does not define."""
    from .backends.base import protocol_members

    def forward(name: str) -> property:
        return property(lambda self: getattr(self._local, name), doc=f"the wrapped backend's `{name}`")

    def mirror(name: str) -> Callable[..., Any]:  # a capability's verb that every rank runs
        return lambda self, *a, **k: self._call(name, *a, **k)

    members = {n: mirror(n) if n in MIRRORED else forward(n)
               for p in protocols for n in protocol_members(p) if not hasattr(base, n)}
    names = "+".join(p.__name__ for p in protocols) or "no protocol"
    return type(f"{base.__name__}[{names}]", (base,), {"__module__": base.__module__, **members})


def driver_backend_factory(factory: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap the runner's backend factory on rank 0: workers build theirs at the same moment."""
    if not launched():
        return factory

    def build() -> Any:
        _broadcast(("init",))
        return DriverBackend(factory())

    return build


def stop_workers(error: str | None = None) -> None:
    """Rank 0, at the end of a run (or on failure): release the workers."""
    if launched() and _CONTROL is not None:
        _broadcast(("stop", error))
        _shutdown()


def _shutdown() -> None:
    """Every rank, at the end: leave the process groups together (a process that exits while
    gloo's threads still talk to its peer aborts)."""
    global _CONTROL
    import torch.distributed as td

    td.barrier(group=_CONTROL)
    td.destroy_process_group()
    _CONTROL = None


def worker_loop(factory: Callable[[], Any]) -> None:
    """Ranks > 0: execute rank 0's backend calls until it says stop; raise if rank 0 failed."""
    backend = None
    objects: dict[int, Any] = {}
    while True:
        msg = _broadcast()
        kind = msg[0]
        if kind == "stop":
            _shutdown()
            if msg[1]:
                raise EmdpoError(f"rank 0 failed: {msg[1]}")
            return
        if kind == "init":
            backend = factory()
            continue
        _, verb, args, kwargs, new, freed, result_id = msg
        for oid in freed:
            objects.pop(oid, None)
        objects.update(new)

        def decode(v: Any) -> Any:
            return objects[v.id] if isinstance(v, _Ref) else v

        result = getattr(backend, verb)(*[decode(a) for a in args], **{k: decode(v) for k, v in kwargs.items()})
        if result_id is not None:
            objects[result_id] = result
