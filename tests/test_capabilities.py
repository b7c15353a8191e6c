"""Capability protocols (backends/base.py): each backend has exactly the capabilities it
implements, rank 0's DriverBackend shows its wrapped backend's, and the bandit's exact oracle
comes from the dataset manifest, whatever reference built the data."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from emdpo_plugin.backends.bandit import BanditBackend
from emdpo_plugin.backends.base import (CAPABILITIES, PolicyBackend, SupportsExactExpectation, SupportsExactRegret,
                                        SupportsExport, SupportsFeatures, SupportsTrainingState, SupportsVLLMSampling,
                                        protocol_members)
from emdpo_plugin.cli import main
from emdpo_plugin.data.manifest import read_manifest
from emdpo_plugin.dist import MIRRORED, DriverBackend

PROTOCOLS = (PolicyBackend, *CAPABILITIES)


def _openrlhf_backend():
    """An OpenRLHFBackend with the attributes its protocol members read, and no model built."""
    from emdpo_plugin.backends.openrlhf_backend import OpenRLHFBackend, OpenRLHFModelConfig

    backend = object.__new__(OpenRLHFBackend)
    backend.cfg = OpenRLHFModelConfig(pretrain="tiny-model")
    backend.beta, backend.label_smoothing, backend.pretrain, backend.stats = 0.1, 0.0, "tiny-model", {}
    return backend


def _vllm_only():
    class VLLMOnly:  # a backend offering one capability and nothing else
        def sample_vllm(self, dirs, prompts, n, seed, *, log_path):
            return {}
    return VLLMOnly()


CASES = {
    "bandit": (BanditBackend, {PolicyBackend, SupportsExactExpectation, SupportsExactRegret}),
    "openrlhf": (_openrlhf_backend, {PolicyBackend, SupportsExport, SupportsVLLMSampling, SupportsFeatures,
                                     SupportsTrainingState}),
    "vllm_only": (_vllm_only, {SupportsVLLMSampling}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_backend_has_exactly_its_capabilities(name):
    make, expected = CASES[name]
    backend = make()
    assert {p for p in PROTOCOLS if isinstance(backend, p)} == expected


@pytest.mark.parametrize("name", list(CASES))
def test_driver_backend_shows_the_wrapped_backends_capabilities(name):
    make, expected = CASES[name]
    inner = make()
    driver = DriverBackend(inner)
    assert {p for p in PROTOCOLS if isinstance(driver, p)} == expected
    for proto in PROTOCOLS:  # Python 3.12+ checks protocols with getattr_static, which __getattr__ cannot answer
        for member in protocol_members(proto):
            found = True
            try:
                inspect.getattr_static(driver, member)
            except AttributeError:
                found = False
            assert found == (proto in expected or hasattr(DriverBackend, member)), (proto.__name__, member)
    for proto in expected - {PolicyBackend}:  # forwarded members are the wrapped backend's
        for member in protocol_members(proto):
            if member in MIRRORED:  # a verb every rank runs: goes through the driver's broadcast
                assert callable(getattr(driver, member)) and getattr(driver, member) != getattr(inner, member)
            else:
                assert getattr(driver, member) == getattr(inner, member)
    assert type(DriverBackend(make())) is type(driver)  # one class per set of capabilities


def test_a_module_function_bandit_builder_keeps_the_exact_oracle(tmp_path: Path, capsys):
    """The oracle is found through the manifest's `environment`, not the builder's registered name;
    `data build` also records its `seed` in the builder config."""
    sets = ["--set", "annotators=6", "--set", "test_contexts=4", "--set", "seed=3"]
    assert main(["data", "build", "data_builders.bandit:build", *sets, "--out", str(tmp_path / "ref")]) == 0
    assert main(["data", "build", "bandit", *sets, "--out", str(tmp_path / "named")]) == 0
    capsys.readouterr()
    by_ref, by_name = read_manifest(tmp_path / "ref"), read_manifest(tmp_path / "named")
    assert by_ref["builder"]["name"] == "data_builders.bandit:build"
    backend = BanditBackend()
    policy = backend.new_policy(0)
    regret_ref = backend.regret_oracle(by_ref)([(1.0, policy)], "group0")
    regret_name = backend.regret_oracle(by_name)([(1.0, policy)], "group0")
    assert np.isfinite(regret_ref) and regret_ref > 0 and regret_ref == regret_name
    assert backend.regret_oracle({"builder": {"name": "imdb_synthetic", "config": {}}}) is None
    assert backend.regret_oracle({"environment": "other", "builder": {"name": "bandit", "config": {}}}) is None

