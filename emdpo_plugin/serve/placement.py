"""Where `openrlhf serve` runs on a CPU host: vLLM's OpenMP threads and the router process.

vLLM-CPU binds one OpenMP thread per core it is given (`VLLM_CPU_OMP_THREADS_BIND`, default
`auto`: every allowed core but the `VLLM_CPU_NUM_OF_RESERVED_CPU` last ones). Any other process
that runs on those cores (vLLM's own API server and scheduler, the router, a client on the same
host) stalls a parallel region, and the idle threads of a region spin (libgomp: 300,000 turns
by default) before they sleep, taking the CPU those processes need. On the 2-core development
host (benchmarks/results/serve_router_cpu_2026-11-27b.md):

- `GOMP_SPINCOUNT=10000` (the default here) gives 62 instead of 48-56 req/s with 8 clients and
  12 instead of 6 req/s for one client, and the router's share of the loss under load is smaller
  (router/direct 0.95-0.96 instead of 0.85-0.97); 1000 is too short (45 req/s), 100,000 about
  as good as 10,000;
- reserving a core for the frontends (`--vllm-reserved-cpus 1`, vLLM's own default) leaves vLLM
  one thread: 12-22 req/s instead of 45-50 with 8 clients, router or not;
- the router pinned to CPU 0 (where vLLM's main thread runs) halves throughput; pinned to
  CPU 1 it is no better than unpinned.

So the defaults give vLLM every core, shorten the spin and leave the router unpinned. On a large
host one would reserve a core or two and pin the router there (not measured here). Each setting
is an option of `openrlhf serve`; the vLLM ones apply only on a CPU host (a GPU vLLM ignores
them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import EmdpoError

DEFAULT_RESERVED_CPUS = 0  # measured best on 2 cores (see the module docstring)
DEFAULT_OMP_SPINCOUNT = 10_000  # libgomp's GOMP_SPINCOUNT; its own default is 300,000


def parse_cpu_list(text: str, flag: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}; a one-line error naming `flag` for anything else."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise EmdpoError(f"{flag}: expected a CPU list such as 1 or 0-3,6, got {text!r}") from None
    return cpus


@dataclass(frozen=True)
class CpuPlacement:
    """`--vllm-cpus`, `--vllm-reserved-cpus`, `--vllm-omp-spincount`, `--router-cpus`; None:
    the environment's value (for the vLLM ones) or the default."""

    vllm_cpus: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0-13"
    vllm_reserved_cpus: int | None = None  # VLLM_CPU_NUM_OF_RESERVED_CPU
    omp_spincount: int | None = None  # GOMP_SPINCOUNT of vLLM's OpenMP threads
    router_cpus: str | None = None  # the router process's CPU affinity

    def check(self) -> None:
        if self.vllm_cpus is not None and self.vllm_cpus not in ("auto", "nobind"):
            parse_cpu_list(self.vllm_cpus.replace("|", ","), "--vllm-cpus")
        if self.vllm_reserved_cpus is not None and self.vllm_reserved_cpus < 0:
            raise EmdpoError(f"--vllm-reserved-cpus: expected 0 or more, got {self.vllm_reserved_cpus}")
        if self.omp_spincount is not None and self.omp_spincount < 0:
            raise EmdpoError(f"--vllm-omp-spincount: expected 0 or more, got {self.omp_spincount}")
        self.router_cpu_set()

    def vllm_env(self) -> dict[str, str]:
        """vLLM-CPU's thread settings: the options, else the environment, else the defaults."""
        env = {}
        for name, option, default in (("VLLM_CPU_NUM_OF_RESERVED_CPU", self.vllm_reserved_cpus, DEFAULT_RESERVED_CPUS),
                                      ("GOMP_SPINCOUNT", self.omp_spincount, DEFAULT_OMP_SPINCOUNT),
                                      ("VLLM_CPU_OMP_THREADS_BIND", self.vllm_cpus, None)):
            value = option if option is not None else os.environ.get(name, default)
            if value is not None:
                env[name] = str(value)
        return env

    def router_cpu_set(self) -> set[int] | None:
        """The router's CPUs, checked against the ones this process may use."""
        if self.router_cpus is None:
            return None
        cpus = parse_cpu_list(self.router_cpus, "--router-cpus")
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            raise EmdpoError(f"--router-cpus: CPUs {sorted(cpus - allowed)} are not available here "
                             f"(allowed: {_ranges(allowed)})")
        return cpus

    def describe(self) -> str:
        """A note for the start-up line: where the router is pinned, if it is."""
        return f"; router pinned to CPUs {self.router_cpus}" if self.router_cpus else ""


def pin_process(cpus: set[int]) -> None:
    """Every thread of this process (and all it starts later) onto `cpus`."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def _ranges(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
