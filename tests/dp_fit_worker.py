"""Worker for the data-parallel test: run under torchrun with 2 CPU processes (gloo)."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_openrlhf_backend import _backend, _margin, _pairs  # noqa: E402

model, out = Path(sys.argv[1]), Path(sys.argv[2])
be = _backend(model, out / "run", train={"micro_batch_size": 8, "batch_size": 16})
data = _pairs(32)
policy = be.new_policy(0)
before = _margin(be, policy, data)
be.fit(policy, data, np.ones(len(data)), warm=False)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in policy.state.values())).hexdigest()
rank = dist.get_rank()
(out / f"rank{rank}.json").write_text(json.dumps({"world_size": dist.get_world_size(), "digest": digest,
                                                  "margin_before": before, "margin_after": _margin(be, policy, data)}))
