"""Worker for the mirroring test: 2 gloo processes, a fake backend, rank 0 drives (see test_launchers)."""

import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emdpo_plugin import dist


@dataclass
class FakePolicy:
    state: dict = field(default_factory=dict)


class FakeBackend:
    beta = 1.0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def new_policy(self, seed):
        self.calls.append("new_policy")
        return FakePolicy({"w": float(seed)})

    def fit(self, policy, data, weights, *, warm=True, desc=""):
        self.calls.append("fit")
        policy.state["w"] += float(np.sum(weights))
        return {"rows": int(len(weights))}

    def score(self, policy, prompts, responses):
        self.calls.append("score")
        idx, mine = dist.shard(list(range(len(prompts))))  # shard and gather as the LM backend does
        vals = [policy.state["w"] * 10 + i for i in mine]
        return np.array(dist.gather(idx, vals, len(prompts)))

    def save(self, policy, path):  # not mirrored: rank 0 only
        self.calls.append("save")


out = Path(sys.argv[1])
dist.init_distributed()
if dist.is_driver():
    be = dist.driver_backend_factory(FakeBackend)()
    p = be.new_policy(1)
    be.fit(p, None, np.ones(3))          # w = 4 on every rank
    previous = copy.deepcopy(p)          # unknown to the workers until sent
    be.fit(p, None, np.ones(2))          # w = 6
    s_new = be.score(p, ["a", "b", "c"], None).tolist()
    s_old = be.score(previous, ["a", "b", "c"], None).tolist()  # the copy travels in full once
    be.save(p, None)
    dist.stop_workers()
    (out / "rank0.json").write_text(json.dumps({"new": s_new, "old": s_old, "calls": be._local.calls}))
else:
    backends = []

    def factory():
        backends.append(FakeBackend())
        return backends[-1]

    dist.worker_loop(factory)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"calls": backends[0].calls}))
