"""One DeepSpeed engine per stage (`backends/train_engine.py`), on CPU with the tiny model: a fit on
the shared engine is the fit a new engine would run, at every ZeRO stage and precision; a carried
optimiser state belongs to its policy alone and survives a save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emdpo_plugin.errors import EmdpoError
from test_openrlhf_backend import _backend, _pairs


def _states_equal(a, b) -> bool:
    return all(torch.equal(a.state[n], b.state[n]) for n in a.state)


def _run(backend, data, warm_twice: bool = True):
    """Two types fitted cold, then the first continued warm: what EM's first iterations do."""
    w = np.ones(len(data))
    p1, p2 = backend.new_policy(1), backend.new_policy(2)
    backend.fit(p1, data, w, warm=False, desc="t1")
    backend.fit(p2, data, w[::-1].copy() * 0.5, warm=False, desc="t2")
    if warm_twice:
        backend.fit(p1, data, w, warm=True, desc="t1 warm")
    return p1, p2


@pytest.mark.parametrize("ds", [{"zero_stage": 0, "param_dtype": "fp32"}, {"zero_stage": 0, "param_dtype": "bf16"},
                                {"zero_stage": 2, "param_dtype": "bf16"}, {"zero_stage": 1, "param_dtype": "fp32"},
                                {"zero_stage": 3, "param_dtype": "fp32"}],
                         ids=lambda d: f"zero{d['zero_stage']}-{d['param_dtype']}")
def test_a_fit_on_the_shared_engine_is_the_fit_of_a_new_engine(tiny_model, tmp_path, ds):
    data = _pairs()
    shared = _backend(tiny_model, tmp_path / "a", lora={"rank": 8}, ds=ds, train={"optimizer_state": "fresh"})
    per_fit = _backend(tiny_model, tmp_path / "b", lora={"rank": 8}, ds=ds, train={"optimizer_state": "fresh"})
    per_fit.engine.per_fit = True  # the pre-shared behaviour: a new engine for every fit, destroyed after it
    a1, a2 = _run(shared, data)
    b1, b2 = _run(per_fit, data)
    assert shared.engine.builds == (3 if ds["zero_stage"] == 3 else 1) and per_fit.engine.builds == 3  # ZeRO-3: per fit
    assert _states_equal(a1, b1) and _states_equal(a2, b2)
    assert not _states_equal(a1, shared.new_policy(1))  # it trained
    shared.release_engine()
    assert shared.engine.engine is None
    shared.fit(a2, data, np.ones(len(data)), warm=True)  # a later stage builds a new one
    assert shared.engine.builds == (4 if ds["zero_stage"] == 3 else 2)


def test_carried_optimizer_state_is_the_policys_own_and_survives_save_and_load(tiny_model, tmp_path):
    data, w = _pairs(), np.ones(32)
    carry = _backend(tiny_model, tmp_path / "a", lora={"rank": 8}, train={"optimizer_state": "carry"})
    p1, p2 = _run(carry, data)  # p2's fit ran between p1's two fits on the same engine
    alone = _backend(tiny_model, tmp_path / "b", lora={"rank": 8}, train={"optimizer_state": "carry"})
    q1 = alone.new_policy(1)
    alone.fit(q1, data, w, warm=False, desc="t1")
    alone.fit(q1, data, w, warm=True, desc="t1 warm")
    assert _states_equal(p1, q1)  # nothing of p2's state reached p1
    assert int(p1.optim["state"][0]["step"]) == 8  # two fits of 4 steps: its own count, not the engine's 12

    fresh = _backend(tiny_model, tmp_path / "c", lora={"rank": 8})  # the default
    f1 = fresh.new_policy(1)
    fresh.fit(f1, data, w, warm=False, desc="t1")
    fresh.fit(f1, data, w, warm=True, desc="t1 warm")
    assert f1.optim is None and not _states_equal(f1, q1)  # the carried state changed the warm fit

    carry.save(p1, tmp_path / "exported")
    assert not (tmp_path / "exported" / "optimizer.pt").exists()  # deployment folders hold the adapter only
    carry.save(p1, tmp_path / "p1")
    carry.save_training_state(p1, tmp_path / "p1")
    assert (tmp_path / "p1" / "optimizer.pt").exists()
    loaded = alone.load(tmp_path / "p1")
    for backend, policy in ((carry, p1), (alone, loaded)):
        backend.fit(policy, data, w, warm=True, desc="t1 again")
    assert _states_equal(p1, loaded)  # a resumed run continues as the uninterrupted one

    (tmp_path / "p1" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(EmdpoError, match=r"p1/optimizer.pt: not a saved optimiser state"):
        alone.load(tmp_path / "p1")
    assert fresh.load(tmp_path / "p1").optim is None  # a backend that does not carry state ignores the file


def test_full_fine_tuning_carries_its_state_too(tiny_model, tmp_path):
    data, w = _pairs(), np.ones(32)
    full = _backend(tiny_model, tmp_path, lora={"rank": 0}, train={"optimizer_state": "carry"})
    p1, _ = _run(full, data, warm_twice=False)
    assert p1.optim is not None and full.engine.builds == 1
    before = {n: t.clone() for n, t in p1.state.items()}
    full.fit(p1, data, w, warm=True)
    assert any(not torch.equal(before[n], p1.state[n]) for n in before)
