"""Routing config emdpo-routing/v1: round trip and every rejection the serving side relies on."""

from __future__ import annotations

import pytest
import yaml

from emdpo_plugin.errors import EmdpoError
from emdpo_plugin.export.routing import AdapterEntry, RoutingConfig, adapter_dirs, load_routing, write_routing


def _config(tmp_path, weights=(0.25, 0.75), paths=("adapters/type0", "adapters/type1")):
    for p in paths:
        (tmp_path / p).mkdir(parents=True, exist_ok=True)
    return RoutingConfig(base_model="/models/base", adapters=[
        AdapterEntry(name=f"type{i}", path=p, weight=w) for i, (p, w) in enumerate(zip(paths, weights))],
        meta={"beta": 0.1})


def test_round_trip(tmp_path):
    cfg = _config(tmp_path)
    path = write_routing(tmp_path / "routing.yaml", cfg)
    loaded = load_routing(path)
    assert loaded == cfg
    assert yaml.safe_load(path.read_text())["format"] == "emdpo-routing/v1"
    assert adapter_dirs(path, loaded)["type1"] == (tmp_path / "adapters" / "type1").resolve()


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["adapters"][0].update(weight=-0.25) or r["adapters"][1].update(weight=1.25), "greater than or equal to 0"),
    (lambda r: r["adapters"][0].update(weight=0.5), "sum to 1"),
    (lambda r: r["adapters"][0].update(path="adapters/missing"), "does not exist"),
    (lambda r: r["adapters"][0].update(path="../outside"), "escapes"),
    (lambda r: r["adapters"][0].update(path="/etc"), "escapes"),
    (lambda r: r.update(format="other/v9"), "format"),
    (lambda r: r.update(extra_key=1), "extra_key"),
])
def test_invalid_configs_are_rejected_with_the_key(tmp_path, mutate, needle):
    (tmp_path / "outside").mkdir()
    sub = tmp_path / "run"
    sub.mkdir()
    raw = _config(sub).model_dump()
    mutate(raw)
    path = sub / "routing.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(EmdpoError) as err:
        load_routing(path)
    assert needle in str(err.value) and str(path) in str(err.value)
