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


def _finished_stage(tmp_path, L):
    stage = tmp_path / "minmax"
    cfg = _config(stage)
    for a in cfg.adapters:
        (stage / a.path / "adapter_config.json").write_text('{"r": 8}')
    write_routing(stage / "routing.yaml", cfg)
    import numpy as np

    np.savez(stage / "game.npz", L=np.asarray(L, dtype=float))
    return stage


def test_export_resolves_the_game_with_priorities(tmp_path):
    import numpy as np

    from emdpo_plugin.algorithms.minmax import game_value_lp, regret_matrix
    from emdpo_plugin.cli import main

    L = [[2.0, -1.0], [-3.0, 1.0]]
    stage = _finished_stage(tmp_path, L)
    plain, weighted = tmp_path / "plain", tmp_path / "w14"
    assert main(["export", str(stage), "--priority", "1,1", "--out", str(plain)]) == 0
    assert main(["export", str(stage), "--priority", "1,4", "--out", str(weighted)]) == 0
    w_plain = [a.weight for a in load_routing(plain / "routing.yaml").adapters]
    w14 = load_routing(weighted / "routing.yaml")
    # the exact LP optimum of the weighted game, and type1 gains weight when its regret counts 4x
    _, lp = game_value_lp(regret_matrix(np.asarray(L), np.array([1.0, 4.0])))
    assert np.allclose([a.weight for a in w14.adapters], lp, atol=5e-3)
    assert w14.adapters[1].weight > w_plain[1] + 0.05
    assert w14.meta["priority"] == [1.0, 4.0] and (weighted / "adapters" / "type1" / "adapter_config.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--priority", "1,4,2"], "expected 2 positive numbers"),
    (["--priority", "1,x"], "comma-separated numbers"),
    (["--priority", "0,1"], "expected 2 positive numbers"),
])
def test_export_rejects_bad_priorities(tmp_path, capsys, args, needle):
    from emdpo_plugin.cli import main

    stage = _finished_stage(tmp_path, [[1.0, 0.0], [0.0, 1.0]])
    assert main(["export", str(stage), *args, "--out", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().err


def test_export_needs_a_finished_minmax_stage(tmp_path, capsys):
    from emdpo_plugin.cli import main

    stage = _finished_stage(tmp_path, [[1.0, 0.0], [0.0, 1.0]])
    (stage / "game.npz").unlink()
    assert main(["export", str(stage), "--priority", "1,1", "--out", str(tmp_path / "o")]) == 2
    assert "no game.npz" in capsys.readouterr().err
