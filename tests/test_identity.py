"""Identity, not location: a result is reused only while what produced it is unchanged (config,
seed, data content, reference model); on --resume exactly the stages downstream of a change re-run.
Fast: fixture trainers, the bandit backend, and a tiny-LM build with its heavy steps faked."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ is a rootdir on sys.path, or a package
    import recipe_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import recipe_fixtures as fx

from data_builders.bandit import build
from emdpo_plugin.backends.bandit import BanditBackend
from emdpo_plugin.backends.ref_cache import ReferenceCache, cache_file
from emdpo_plugin.cli import main
from emdpo_plugin.data.io import load_dataset_dir
from emdpo_plugin.data.io import write_dataset_dir
from emdpo_plugin.data.manifest import build_manifest
from emdpo_plugin.data.schema import Comparison, ComparisonSet
from emdpo_plugin.data.sources import read_source
from emdpo_plugin.data.validate import validate_path
from emdpo_plugin.errors import DataError
from emdpo_plugin.models import tiny
from emdpo_plugin.recipe.loader import load_recipe
from emdpo_plugin.recipe.runner import run_plan
from emdpo_plugin.recipe.schema import validate_recipe
from emdpo_plugin.trainers.base import StageContext
from emdpo_plugin.trainers.em_dpo import EMConfig, EMDPOStage

M = fx.__name__
W, C = f"{M}:WriteTrainer", f"{M}:ConsumeTrainer"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(recipe: Path, *overrides: str, resume: bool = False) -> dict:
    """Run in this process (so monkeypatched builds apply); returns run.json."""
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["run", str(recipe), *(["--resume"] if resume else []), *args]) == 0
    return json.loads((Path(load_recipe(recipe)["output_dir"]) / "run.json").read_text())


def counts(run_dir: Path) -> dict[str, int]:
    return json.loads((run_dir / "counts.json").read_text())


# --- the runner: exactly the stages downstream of a change -------------------------------------


def test_seed_change_reruns_every_stage(tmp_path):
    p = write(tmp_path / "r.yaml", f"""
        name: r
        seed: 3
        output_dir: {tmp_path / 'out'}
        stages:
          - {{name: a, trainer: "{W}"}}
          - {{name: b, trainer: "{C}", inputs: {{source: a}}}}
        """)
    run(p)
    state = run(p, "seed=4", resume=True)
    assert counts(tmp_path / "out") == {"a": 2, "b": 2} and state["seed"] == 4


def test_sft_config_change_reruns_the_sft_stage_and_all_that_load_its_model(tmp_path):
    """`model.pretrain: stage:sft` makes every later stage depend on sft; the data stage does not."""
    p = write(tmp_path / "r.yaml", f"""
        name: r
        output_dir: {tmp_path / 'out'}
        model: {{backend: "{M}:FakeBackend", pretrain: "stage:sft"}}
        stages:
          - {{name: data, trainer: "{W}"}}
          - {{name: sft, trainer: "{W}", config: {{text: a}}}}
          - {{name: em, trainer: "{C}", inputs: {{source: data}}}}
          - {{name: report, trainer: "{C}", inputs: {{source: em}}}}
        """)
    run(p)
    run(p, resume=True)
    assert counts(tmp_path / "out") == {"data": 1, "sft": 1, "em": 1, "report": 1}
    run(p, "stages.sft.config.text=b", resume=True)
    assert counts(tmp_path / "out") == {"data": 1, "sft": 2, "em": 2, "report": 2}


def test_a_changed_upstream_output_reruns_its_consumers_even_with_equal_configs(tmp_path):
    p = write(tmp_path / "r.yaml", f"""
        name: r
        output_dir: {tmp_path / 'out'}
        stages:
          - {{name: a, trainer: "{W}"}}
          - {{name: b, trainer: "{C}", inputs: {{source: a}}}}
          - {{name: lone, trainer: "{W}"}}
        """)
    state = run(p)
    assert all(len(st["fingerprint"]) == 16 for st in state["stages"].values())
    state["stages"]["a"]["outputs"]["n"] = 7  # a's result is not what b was computed from
    (tmp_path / "out" / "run.json").write_text(json.dumps(state))
    again = run(p, resume=True)
    assert counts(tmp_path / "out") == {"a": 1, "b": 2, "lone": 1}
    assert again["stages"]["b"]["outputs"]["got"]["n"] == 7


def _rows(prompt: str) -> str:
    return "".join(json.dumps({"annotator_id": f"u{i % 2}", "prompt": f"{prompt} {i}", "chosen": "yes",
                               "rejected": "no"}) + "\n" for i in range(4))


def test_data_file_edited_in_place_reruns_the_data_stage_and_its_consumers_only(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(_rows("question"))
    p = write(tmp_path / "r.yaml", f"""
        name: r
        output_dir: {tmp_path / 'out'}
        data: {{path: {data}}}
        stages:
          - {{name: data, trainer: data}}
          - {{name: use, trainer: "{C}", inputs: {{source: data}}}}
          - {{name: lone, trainer: "{W}"}}
        """)
    first = run(p)
    data.write_text(_rows("another question"))  # same path, same config, same counts: other content
    again = run(p, resume=True)
    assert counts(tmp_path / "out") == {"use": 2, "lone": 1}
    old, new = first["stages"]["data"]["outputs"], again["stages"]["data"]["outputs"]
    assert old["train"] == new["train"] and old["content_hash"] != new["content_hash"]
    assert load_dataset_dir(tmp_path / "out" / "data").train.prompts[0] == "another question 0"


# --- EM checkpoints ------------------------------------------------------------------------------


def test_em_after_a_seed_change_refits_instead_of_returning_its_old_checkpoint(tmp_path):
    """The new data has the old paths and counts, which used to make the old checkpoint match."""
    p, ckpt = fx.bandit_em_recipe(tmp_path / "em.yaml", tmp_path / "out"), tmp_path / "out" / "em" / "restarts" / "r0"
    first = run(p)["stages"]
    (ckpt / "kept.txt").write_text("from seed 1")  # a refit swaps in a checkpoint folder without it
    again = run(p, "seed=2", resume=True)["stages"]
    assert {k: first["data"]["outputs"][k] for k in ("dir", "train", "test")} == \
           {k: again["data"]["outputs"][k] for k in ("dir", "train", "test")}
    assert not (ckpt / "kept.txt").exists()
    assert again["em"]["outputs"]["log_likelihood"] != first["em"]["outputs"]["log_likelihood"]


def _bandit_data(folder: Path, seed: int) -> None:
    ds = build({"annotators": 12, "pairs_per_annotator": 4}, seed=seed)
    write_dataset_dir(folder, ds.train, ds.test, build_manifest(ds.train, ds.test, builder="bandit", config=ds.config))


def test_em_checkpoint_is_keyed_by_seed_data_content_and_reference(tmp_path):
    _bandit_data(tmp_path / "data", seed=2)
    backend = BanditBackend({"epochs": 20, "warm_epochs": 20}, seed=2)
    inputs = {"dataset": {"dir": "data", "manifest": "data/manifest.json"}}  # the same whatever the content
    marker = tmp_path / "em" / "restarts" / "r0" / "kept.txt"

    def em(seed: int = 2) -> dict:
        ctx = StageContext(run_dir=tmp_path, stage_name="em", seed=seed, recipe={"model": {}}, _backend=backend)
        return EMDPOStage().run(ctx, EMConfig(K=2, iterations=2), inputs)

    em()
    marker.write_text("kept")
    em()
    assert marker.exists()  # the same seed, data and reference: the finished checkpoint is resumed
    for change in ("data", "seed", "reference"):
        marker.write_text("kept")
        if change == "data":
            _bandit_data(tmp_path / "data", seed=3)
        elif change == "reference":
            backend.reference_identity = {"model": "another reference"}
        em(seed=5 if change == "seed" else 2)
        assert not marker.exists(), change


# --- the tiny SFT model --------------------------------------------------------------------------


@pytest.fixture
def fake_tiny_build(monkeypatch) -> list[dict]:
    """build_tiny_lm's tokenizer, init and SFT replaced by fakes that record each build."""
    builds: list[dict] = []

    def init(tokenizer, init_dir: Path, **kw) -> None:
        init_dir.mkdir(parents=True)

    def sft(init_dir: Path, save_dir: Path, texts: list[str], **kw) -> dict:
        save_dir.mkdir(parents=True)
        (save_dir / "weights.txt").write_text(json.dumps({"texts": texts, **kw}))
        builds.append({"texts": texts, **kw})
        return {"steps": kw["steps"]}

    monkeypatch.setattr(tiny, "_train_tokenizer", lambda *a: None)
    monkeypatch.setattr(tiny, "_init_model", init)
    monkeypatch.setattr(tiny, "sft_through_openrlhf", sft)
    return builds


def test_tiny_model_is_reused_only_for_the_same_config_and_texts(tmp_path, fake_tiny_build):
    out = tmp_path / "lm" / "model"
    tiny.build_tiny_lm(["a b", "c d"], out, sft_steps=2)
    tiny.build_tiny_lm(["a b", "c d"], out, sft_steps=2)
    assert len(fake_tiny_build) == 1
    tiny.build_tiny_lm(["a b", "c d"], out, sft_steps=3)
    assert len(fake_tiny_build) == 2 and tiny.read_build_info(out)["config"]["sft_steps"] == 3
    tiny.build_tiny_lm(["a b", "e f"], out, sft_steps=3)
    assert len(fake_tiny_build) == 3 and "e f" in (out / "weights.txt").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no stale or half-built sibling


def test_sft_stage_rebuilds_on_config_or_data_change_and_keeps_a_matching_model(tmp_path, fake_tiny_build):
    p = write(tmp_path / "sft.yaml", f"""
        name: sft
        seed: 1
        output_dir: {tmp_path / 'out'}
        data: {{builder: bandit, config: {{annotators: 6, pairs_per_annotator: 2}}}}
        stages:
          - {{name: data, trainer: data}}
          - {{name: sft, trainer: sft, inputs: {{dataset: data}}, config: {{sft_steps: 2}}}}
        """)
    first = run(p)["stages"]["sft"]["outputs"]
    state_file = tmp_path / "out" / "run.json"
    state = json.loads(state_file.read_text())
    state["stages"]["sft"].update(status="running", outputs=None)  # killed before it was marked done
    state_file.write_text(json.dumps(state))
    assert run(p, resume=True)["stages"]["sft"]["outputs"] == first and len(fake_tiny_build) == 1
    changed = run(p, "stages.sft.config.sft_steps=3", resume=True)["stages"]["sft"]["outputs"]
    assert len(fake_tiny_build) == 2 and changed["fingerprint"] != first["fingerprint"]
    other_data = run(p, "data.config.pairs_per_annotator=3", "stages.sft.config.sft_steps=3", resume=True)
    assert len(fake_tiny_build) == 3 and other_data["stages"]["sft"]["outputs"]["fingerprint"] != changed["fingerprint"]


# --- reference log-probs -------------------------------------------------------------------------


def _comparisons(prompts: list[str]) -> ComparisonSet:
    return ComparisonSet([Comparison("a", p, [" x", " yy"], [0, 1], f"c{i}") for i, p in enumerate(prompts)])


def _fake_reference(data: ComparisonSet, calls: list[int]):
    def compute(rows: list[int]) -> np.ndarray:
        calls.append(len(rows))
        return np.array([[len(data.prompts[i]) + len(r) for r in data.responses[i]] for i in rows], dtype=float)
    return compute


def test_reference_cache_never_serves_a_stale_entry_when_prompts_change_but_ids_stay(tmp_path):
    path = cache_file(tmp_path, {"model": "sft fingerprint 1"})
    first, calls = _comparisons(["p", "pp", "ppp"]), []
    scores, computed = ReferenceCache(path).scores(first, _fake_reference(first, calls))
    assert computed == 3 and scores[:, 0].tolist() == [3, 4, 5]
    changed = _comparisons(["qqqq", "pp", "q"])  # ids c0..c2 again, two prompts changed
    scores, computed = ReferenceCache(path).scores(changed, _fake_reference(changed, calls))
    assert computed == 2 and calls == [3, 2] and scores[:, 0].tolist() == [6, 4, 3]
    _, computed = ReferenceCache(path).scores(first, _fake_reference(first, calls))  # a resumed run
    assert computed == 0 and calls == [3, 2]
    other = cache_file(tmp_path, {"model": "sft fingerprint 2"})  # another reference model: another file
    assert other != path
    assert ReferenceCache(other).scores(first, _fake_reference(first, calls))[1] == 3


# --- comparison ids across splits ----------------------------------------------------------------


def test_a_comparison_id_in_two_splits_is_refused_naming_it_and_the_splits(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    row = {"annotator_id": "u", "chosen": "yes", "rejected": "no"}
    (folder / "train.jsonl").write_text("".join(json.dumps({**row, "prompt": f"t{i}", "comparison_id": f"c{i}"}) + "\n"
                                                for i in range(3)))
    (folder / "test.jsonl").write_text(json.dumps({**row, "prompt": "held out", "comparison_id": "c1"}) + "\n")
    for check in (load_dataset_dir, validate_path, read_source):
        with pytest.raises(DataError) as info:
            check(folder) if check is not read_source else check(str(folder))
        message = str(info.value)
        assert "\n" not in message and "'c1'" in message and "train" in message and "test" in message, message


def test_reliability_doc_names_only_tests_that_exist():
    """docs/reliability.md pairs each guarantee with its test: a renamed test must not leave it stale."""
    root = Path(__file__).resolve().parent
    defined = {m for f in root.glob("test_*.py") for m in re.findall(r"^(?:async )?def (test_\w+)", f.read_text(), re.M)}
    words = re.findall(r"(?<![\w.])(test_\w+)(\.py)?", (root.parent / "docs" / "reliability.md").read_text())
    named = {name for name, is_file in words if not is_file}
    assert len(named) > 20 and named <= defined, sorted(named - defined)
