"""Named kill points, so tests can SIGKILL a run at an exact place (tests/test_faults.py).

`EMDPO_FAULT=<point>` makes the process kill itself with SIGKILL the first time it passes
`point(<point>)`; `EMDPO_FAULT=<point>:<n>` the n-th time. SIGKILL, not an exception: nothing
is cleaned up, no `finally` runs, exactly as when the machine or the OOM killer stops a run.
Timing a kill from outside (polling files, sleeping) would make the tests flaky; a point makes
them deterministic. Unset, a call costs one environment lookup.

Points (where a kill can fall, and what each checks on `--resume`):
- `runner.stage_done`: after a stage was marked done in run.json, before the next one starts;
- `em.m_step`: inside an EM M-step, after its fits and before its E-step and checkpoint
  (seeding fits do not pass it);
- `em.checkpoint.written`, `em.checkpoint.swapping`, `em.checkpoint.swapped`: inside
  `_Checkpoint.save`, after the new checkpoint is written to `.tmp`, after the last one was
  moved aside to `.old` (no checkpoint at its place), after the new one was renamed into place.
"""

from __future__ import annotations

import os
import signal

ENV = "EMDPO_FAULT"
POINTS = ("runner.stage_done", "em.m_step", "em.checkpoint.written", "em.checkpoint.swapping",
          "em.checkpoint.swapped")

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if `EMDPO_FAULT` names `name` and this is the hit it counts to."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
