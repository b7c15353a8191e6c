"""Recipes: loading (extends, --set), validation, the stage runner, run.json and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

try:  # tests/ is a rootdir on sys.path, or a package
    import recipe_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import recipe_fixtures as fx

from emdpo_plugin.cli import main
from emdpo_plugin.errors import RecipeError
from emdpo_plugin.recipe.loader import load_recipe
from emdpo_plugin.recipe.runner import run_plan
from emdpo_plugin.recipe.schema import validate_recipe

M = fx.__name__
W, C, F, B = f"{M}:WriteTrainer", f"{M}:ConsumeTrainer", f"{M}:FailTrainer", f"{M}:BackendTrainer"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    """a (write) -> b (consume a) -> c (write, upstream b)."""
    return write(
        tmp_path / "pipe.yaml",
        f"""
        name: pipe
        seed: 3
        output_dir: {tmp_path / 'out'}
        stages:
          - {{name: a, trainer: "{W}", config: {{text: x, n: 2}}}}
          - {{name: b, trainer: "{C}", inputs: {{source: a}}}}
          - {{name: c, trainer: "{W}", inputs: {{upstream: b}}}}
        """,
    )


def counts(run_dir: Path) -> dict[str, int]:
    return json.loads((run_dir / "counts.json").read_text())


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


# --- loader ---------------------------------------------------------------------------------


def test_extends_deep_merges_and_merges_stages_by_name(tmp_path):
    write(
        tmp_path / "grand.yaml",
        f"""
        name: grand
        model: {{backend: bandit, hidden: 8, opt: {{lr: 0.1, wd: 0.0}}}}
        stages:
          - {{name: a, trainer: "{W}", config: {{text: g, n: 1}}}}
        """,
    )
    write(
        tmp_path / "base.yaml",
        f"""
        extends: grand.yaml
        name: base
        seed: 5
        stages:
          - {{name: b, trainer: "{W}"}}
          - {{name: c, trainer: "{W}", config: {{n: 4}}}}
        """,
    )
    child = write(
        tmp_path / "sub" / "child.yaml",
        f"""
        extends: ../base.yaml
        name: child
        model: {{opt: {{lr: 0.5}}}}
        stages:
          - {{name: a, config: {{n: 9}}}}
          - {{name: b, drop: true}}
          - {{name: d, trainer: "{W}", inputs: {{upstream: a}}}}
        """,
    )
    r = load_recipe(child, allow_extends_outside=True)  # sub/child.yaml extends ../base.yaml: outside sub/
    assert r["name"] == "child" and r["seed"] == 5
    assert r["model"] == {"backend": "bandit", "hidden": 8, "opt": {"lr": 0.5, "wd": 0.0}}
    assert [s["name"] for s in r["stages"]] == ["a", "c", "d"]
    assert r["stages"][0] == {"name": "a", "trainer": W, "config": {"text": "g", "n": 9}, "inputs": {}}
    assert r["stages"][1]["config"] == {"n": 4}
    assert "extends" not in r and r["data"] == {}


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path / "a.yaml", "name: a\nextends: b.yaml\nstages: []\n")
    write(tmp_path / "b.yaml", "name: b\nextends: a.yaml\n")
    with pytest.raises(RecipeError, match="extends: cycle"):
        load_recipe(tmp_path / "a.yaml")
    lone = write(tmp_path / "c.yaml", "name: c\nextends: nope.yaml\n")
    with pytest.raises(RecipeError, match=r"c\.yaml: extends: recipe file not found"):
        load_recipe(lone)


def test_drop_of_unknown_stage_and_bad_yaml(tmp_path):
    write(tmp_path / "p.yaml", f"name: p\nstages: [{{name: a, trainer: '{W}'}}]\n")
    c = write(tmp_path / "c.yaml", "extends: p.yaml\nname: c\nstages: [{name: zz, drop: true}]\n")
    with pytest.raises(RecipeError, match=r"c\.yaml: stages\.zz\.drop: no parent stage"):
        load_recipe(c)
    bad = write(tmp_path / "bad.yaml", "name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: invalid YAML at line"):
        load_recipe(bad)


def test_overrides_are_typed_and_address_stages_by_name(pipeline):
    r = load_recipe(
        pipeline,
        [
            "stages.a.config.n=3",
            "stages.a.config.sizes=[1,4]",
            "stages.b.config.scale=0.1",
            "seed=7",
            "model.hidden=16",
            "data.opts.flag=true",  # missing intermediate under data: created
            "stages.c.config.deep.x=abc",  # ... and under config
            "stages.c.inputs.upstream=a",
        ],
    )
    a, b, c = r["stages"]
    assert a["config"] == {"text": "x", "n": 3, "sizes": [1, 4]}
    assert b["config"] == {"scale": 0.1}
    assert r["seed"] == 7 and r["model"] == {"hidden": 16}
    assert r["data"] == {"opts": {"flag": True}}
    assert c["config"] == {"deep": {"x": "abc"}} and c["inputs"] == {"upstream": "a"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.emm.config.K=3", r"--set stages\.emm\.config\.K: no stage named 'emm'"),
        ("foo.bar=1", r"--set foo\.bar: unknown top-level key 'foo'"),
        ("seed.x=1", r"--set seed\.x: 'seed' is int 3, not a mapping"),
        ("stages.a.bogus=1", r"--set stages\.a\.bogus: unknown stage key 'bogus'"),
        ("stages.a.inputs.x.y=1", r"--set stages\.a\.inputs\.x\.y: 'stages\.a\.inputs\.x' does not exist"),
        ("seed=abc", r"seed: expected int, got 'abc'"),
        ("novalue", r"--set novalue: expected KEY=VALUE"),
    ],
)
def test_override_errors_name_file_and_key(pipeline, override, message):
    with pytest.raises(RecipeError, match=r"pipe\.yaml: .*" + message):
        load_recipe(pipeline, [override])


def test_unknown_top_level_key_and_missing_name(tmp_path):
    p = write(tmp_path / "r.yaml", "name: r\nstagez: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: stagez: unknown top-level key"):
        load_recipe(p)
    p = write(tmp_path / "n.yaml", f"stages: [{{name: a, trainer: '{W}'}}]\n")
    with pytest.raises(RecipeError, match=r"n\.yaml: name: required"):
        load_recipe(p)


# --- schema ---------------------------------------------------------------------------------


def plan_for(tmp_path: Path, stages: str, overrides=()):
    p = write(tmp_path / "r.yaml", f"name: r\nstages:\n{textwrap.indent(textwrap.dedent(stages), '  ')}")
    return validate_recipe(load_recipe(p, overrides), source=str(p))


def test_unknown_trainer(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.x\.trainer: unknown trainer 'nope' \(registered: .*em_dpo"):
        plan_for(tmp_path, "- {name: x, trainer: nope}")
    with pytest.raises(RecipeError, match=r"stages\.x\.trainer: .*is not a trainer"):
        plan_for(tmp_path, f"- {{name: x, trainer: '{M}:NotATrainer'}}")


def test_unknown_config_key_and_bad_type(tmp_path):
    with pytest.raises(RecipeError) as err:
        plan_for(tmp_path, f"- {{name: em, trainer: '{W}', config: {{foo: 1}}}}")
    assert "stages.em.config.foo: unknown key" in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "r.yaml"))
    with pytest.raises(RecipeError, match=r"stages\.em\.config\.n: expected int, got 'abc'"):
        plan_for(tmp_path, f"- {{name: em, trainer: '{W}'}}", ["stages.em.config.n=abc"])
    with pytest.raises(RecipeError, match=r"stages\.em\.config\.sizes\.1: expected int, got 'z'"):
        plan_for(tmp_path, f"- {{name: em, trainer: '{W}', config: {{sizes: [1, z]}}}}")


@pytest.mark.parametrize(
    "stages, message",
    [
        (f"- {{name: b, trainer: '{C}', inputs: {{source: emm}}}}", r"stages\.b\.inputs\.source: no earlier stage named 'emm'"),
        (
            f"- {{name: b, trainer: '{C}', inputs: {{source: a}}}}\n- {{name: a, trainer: '{W}'}}",
            r"stages\.b\.inputs\.source: no earlier stage named 'a' \(stage 'a' runs later\)",
        ),
        (f"- {{name: a, trainer: '{W}'}}\n- {{name: b, trainer: '{C}'}}", r"stages\.b\.inputs\.source: required input missing"),
        (f"- {{name: a, trainer: '{W}', inputs: {{zzz: a}}}}", r"stages\.a\.inputs\.zzz: unknown input slot"),
        (f"- {{name: 1a, trainer: '{W}'}}", r"stages\.1a\.name: '1a' is not a valid stage name"),
        (f"- {{name: a, trainer: '{W}', config: 3}}", r"stages\.a\.config: expected mapping, got 3"),
        (f"- {{name: cache, trainer: '{W}'}}", r"stages\.cache\.name: 'cache' is reserved for the run folder's"),
    ],
)
def test_stage_graph_errors(tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):
        plan_for(tmp_path, stages)


def test_validate_raw_dict_errors_name_stage():
    raw = {"name": "r", "stages": [{"name": "a", "trainer": W, "bogus": 1}]}
    with pytest.raises(RecipeError, match=r"^stages\.a\.bogus: unknown key"):
        validate_recipe(raw)
    with pytest.raises(RecipeError, match=r"duplicate stage name"):
        validate_recipe({"name": "r", "stages": [{"name": "a", "trainer": W}] * 2})
    with pytest.raises(RecipeError, match=r"model\.backend: unknown policy backend 'zz'"):
        validate_recipe({"name": "r", "model": {"backend": "zz"}, "stages": [{"name": "a", "trainer": W}]})


# --- runner / run.json ------------------------------------------------------------------------


def test_run_writes_run_json_and_passes_outputs(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("run", pipeline) == 0
    state = json.loads((out / "run.json").read_text())
    assert state["recipe"] == "pipe" and state["seed"] == 3 and state["recipe_path"] == str(pipeline)
    assert state["created"] and state["updated"]
    assert list(state["stages"]) == ["a", "b", "c"]
    a, b, c = (state["stages"][k] for k in "abc")
    for st in (a, b, c):
        assert st["status"] == "done" and st["error"] is None
        assert st["started"] and st["ended"] and st["seconds"] >= 0 and len(st["config_hash"]) == 16
    assert a["trainer"] == W and a["outputs"]["n"] == 2
    assert (out / "a" / "out.txt").read_text() == "xx"
    assert b["outputs"]["got"] == a["outputs"]  # inputs = the referenced stage's recorded outputs
    assert c["outputs"]["inputs"] == {"upstream": b["outputs"]}
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved == load_recipe(pipeline)
    stdout = capsys.readouterr().out
    assert "start a" in stdout and "done c in" in stdout
    assert not list(out.glob(".*.tmp"))


def test_resume_skips_done_and_reruns_changed_stage_and_after(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("run", pipeline) == 0
    assert run_cli("run", pipeline, "--resume") == 0
    assert counts(out) == {"a": 1, "b": 1, "c": 1}
    assert "skip a (done)" in capsys.readouterr().out
    assert run_cli("run", pipeline, "--resume", "--set", "stages.b.config.scale=2") == 0
    assert counts(out) == {"a": 1, "b": 2, "c": 2}
    out_text = capsys.readouterr().out
    assert "skip a (done)" in out_text and "skip b" not in out_text
    state = json.loads((out / "run.json").read_text())
    assert state["stages"]["b"]["outputs"]["scale"] == 2.0


def test_rerun_without_resume_is_an_error(pipeline, tmp_path, capsys):
    assert run_cli("run", pipeline) == 0
    capsys.readouterr()
    assert run_cli("run", pipeline) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--resume" in err
    assert run_cli("run", pipeline, "--output-dir", tmp_path / "other") == 0


def test_failed_stage_is_recorded_and_propagates(tmp_path):
    p = write(
        tmp_path / "f.yaml",
        f"""
        name: f
        output_dir: {tmp_path / 'out'}
        stages:
          - {{name: a, trainer: "{W}"}}
          - {{name: bad, trainer: "{F}"}}
          - {{name: after, trainer: "{W}"}}
        """,
    )
    with pytest.raises(RuntimeError, match="boom"):
        run_cli("run", p)  # not a user error: propagates, the script exits non-zero
    state = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [state["stages"][k]["status"] for k in ("a", "bad", "after")] == ["done", "failed", "pending"]
    assert state["stages"]["bad"]["error"] == "RuntimeError: boom"
    assert run_cli("run", p, "--resume", "--set", "stages.bad.config.fail=false") == 0
    assert counts(tmp_path / "out") == {"a": 1, "bad": 2, "after": 1}


def test_backend_is_built_lazily_once_from_model_section(tmp_path):
    fx.FakeBackend.built = 0
    p = write(
        tmp_path / "b.yaml",
        f"""
        name: b
        seed: 11
        model: {{backend: "{M}:FakeBackend", hidden: 4}}
        stages:
          - {{name: w, trainer: "{W}"}}
          - {{name: u, trainer: "{B}"}}
          - {{name: v, trainer: "{B}"}}
        """,
    )
    plan = validate_recipe(load_recipe(p))
    state = run_plan(plan, tmp_path / "out")
    assert state["stages"]["u"]["outputs"] == {"options": {"hidden": 4}, "seed": 11, "built": 1}
    assert state["stages"]["v"]["outputs"]["built"] == 1


def test_dry_run_prints_plan_and_writes_nothing(pipeline, tmp_path, capsys):
    fx.FakeBackend.built = 0
    code = run_cli(
        "run", pipeline, "--dry-run", "--set", f"model.backend={M}:FakeBackend", "--set", "data.path=d.jsonl"
    )
    assert code == 0
    text = capsys.readouterr().out
    doc = yaml.safe_load(text)
    assert [s["name"] for s in doc["stages"]] == ["a", "b", "c"]
    assert doc["stages"][0]["config"] == {"text": "x", "n": 2, "sizes": [1, 2]}  # defaults included
    assert doc["stages"][1] == {"name": "b", "trainer": C, "inputs": {"source": "a"}, "config": {"scale": 1.0}}
    assert doc["data"] == {"path": "d.jsonl"} and doc["model"]["backend"] == f"{M}:FakeBackend"
    assert not (tmp_path / "out").exists() and fx.FakeBackend.built == 0
    # dry-run validates everything
    assert run_cli("run", pipeline, "--dry-run", "--set", "stages.b.config.zz=1") == 2


# --- CLI --------------------------------------------------------------------------------------


def test_cli_unknown_trainer_is_one_line_exit_2(tmp_path, capsys):
    p = write(tmp_path / "u.yaml", "name: u\noutput_dir: out\nstages: [{name: x, trainer: nope}]\n")
    assert run_cli("run", p) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {p}: stages.x.trainer: unknown trainer 'nope'")


def test_cli_trainers_lists_fields(capsys, monkeypatch):
    assert run_cli("trainers", W, C) == 0
    out = capsys.readouterr().out
    assert "writes a file (test)" in out and "n: int = 1  # a number" in out
    assert "sizes: list[int] = [1, 2]" in out and "source (required)" in out
    assert run_cli("trainers", "nope") == 2
    # all registered: a broken entry point is listed, not fatal (registry stubbed: keeps this fast)
    from emdpo_plugin import registry

    monkeypatch.setattr(registry, "names", lambda group: ["nope", W] if group == registry.TRAINERS else [])
    capsys.readouterr()
    assert run_cli("trainers") == 0
    out = capsys.readouterr().out
    assert "nope\n  (cannot load: unknown trainer 'nope'" in out and "writes a file (test)" in out


def test_cli_data_validate(monkeypatch, capsys):
    from emdpo_plugin.data import validate as dv
    from emdpo_plugin.errors import DataError

    class Report:
        def summary(self):
            return "3 rows, fine"

    monkeypatch.setattr(dv, "validate_path", lambda path, keys=None: Report())
    assert run_cli("data", "validate", "x.jsonl") == 0
    assert capsys.readouterr().out.strip() == "3 rows, fine"

    def bad(path, keys=None):
        raise DataError(f"{path}: row 2: annotator_id: required")

    monkeypatch.setattr(dv, "validate_path", bad)
    assert run_cli("data", "validate", "x.jsonl") == 2
    assert capsys.readouterr().err == "error: x.jsonl: row 2: annotator_id: required\n"


def test_cli_usage_errors_return_codes(capsys):
    assert main([]) == 2
    assert main(["run"]) == 2
    assert main(["--version"]) == 0


def test_installed_script_unknown_trainer(tmp_path):
    script = Path(sys.executable).parent / "openrlhf"
    if not script.exists():
        pytest.skip("console script not installed")
    p = write(tmp_path / "u.yaml", "name: u\nstages: [{name: x, trainer: no_such_trainer}]\n")
    proc = subprocess.run([str(script), "run", str(p), "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_trainer" in lines[0] and "Traceback" not in proc.stderr


# --- one writer per run folder ------------------------------------------------------------------


def test_second_run_into_a_locked_folder_fails_at_once_naming_the_holder(pipeline, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # a second open file description: flock conflicts with it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert run_cli("run", pipeline) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {out}: another openrlhf run (pid 4242)")
        assert not (out / "run.json").exists()
    assert run_cli("run", pipeline) == 0  # released: the next run goes ahead


def test_lock_names_a_live_holder_process_and_dies_with_it(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from emdpo_plugin.recipe.lock import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_cli("run", pipeline) == 2
        assert f"(pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()  # killed, not released: the kernel drops the lock
        holder.wait(10)
    assert run_cli("run", pipeline) == 0


def test_only_the_driver_rank_locks(pipeline, tmp_path, monkeypatch):
    import fcntl

    from emdpo_plugin import dist

    served = []
    monkeypatch.setattr(dist, "init_distributed", lambda: None)
    monkeypatch.setattr(dist, "is_driver", lambda: False)
    monkeypatch.setattr(dist, "worker_loop", served.append)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # rank 0 holds it; a worker rank must not try
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_plan(validate_recipe(load_recipe(pipeline)), out) == {} and len(served) == 1


# --- stage folders: nothing half-written is read --------------------------------------------------


@pytest.fixture
def resumable(tmp_path: Path) -> Path:
    """a (write) -> r (writes a stray file and a checkpoint, then fails unless told not to) -> c (reads r)."""
    return write(
        tmp_path / "res.yaml",
        f"""
        name: res
        output_dir: {tmp_path / 'out'}
        stages:
          - {{name: a, trainer: "{W}"}}
          - {{name: r, trainer: "{M}:ResumableTrainer", config: {{fail: true}}}}
          - {{name: c, trainer: "{C}", inputs: {{source: r}}}}
        """,
    )


def test_a_killed_stage_keeps_only_its_resume_state_and_is_never_read(resumable, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed half-way"):
        run_cli("run", resumable)
    assert sorted(p.name for p in (out / "r").iterdir()) == ["ckpt", "half.txt"]
    state = json.loads((out / "run.json").read_text())
    assert state["stages"]["r"]["status"] == "failed" and state["stages"]["r"]["outputs"] is None
    assert state["stages"]["c"]["status"] == "pending"  # nothing downstream read the half-written folder
    (out / ".run.json.x1y2.tmp").write_text("{")  # a kill inside write_atomic
    assert run_cli("run", resumable, "--resume", "--set", "stages.r.config.fail=false") == 0
    r = json.loads((out / "run.json").read_text())["stages"]["r"]["outputs"]
    assert r["found_at_start"] == ["ckpt"] and r["resumed_from"] == "attempt 1"
    assert "removed what an unfinished or earlier attempt left in r/: half.txt" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))


def test_a_rerun_stage_loses_the_files_of_its_earlier_result(pipeline, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", pipeline) == 0
    (out / "c" / "stale.txt").write_text("from the run before")  # c re-runs after b
    assert run_cli("run", pipeline, "--resume", "--set", "stages.b.config.scale=2") == 0
    assert not (out / "c" / "stale.txt").exists() and (out / "c" / "out.txt").exists()


def test_em_stage_rerun_after_a_kill_resumes_from_its_checkpoints_only(tmp_path):
    """The real em_dpo stage: a re-run keeps restarts/ (its resume state) and nothing else."""
    p = fx.bandit_em_recipe(tmp_path / "em.yaml", tmp_path / "out", restarts=2)
    out = tmp_path / "out"
    assert run_cli("run", p) == 0
    first = json.loads((out / "run.json").read_text())["stages"]["em"]["outputs"]
    for r in ("r0", "r1"):  # a refit would swap in new checkpoint folders without these
        (out / "em" / "restarts" / r / "kept.txt").write_text(r)
    # what a kill during the stage's final writes leaves: run.json says running, a half-written
    # result, and a checkpoint swap stopped half-way
    state = json.loads((out / "run.json").read_text())
    state["stages"]["em"].update(status="running", outputs=None)
    (out / "run.json").write_text(json.dumps(state))
    (out / "em" / "clustering.json").write_text("{")
    (out / "em" / "restarts" / "r1").rename(out / "em" / "restarts" / "r1.old")
    assert run_cli("run", p, "--resume") == 0
    again = json.loads((out / "run.json").read_text())["stages"]["em"]["outputs"]
    assert again["log_likelihood"] == first["log_likelihood"] and again["iterations"] == first["iterations"]
    assert json.loads((out / "em" / "clustering.json").read_text())["resumed_from_iteration"] == []
    assert sorted(p.name for p in (out / "em" / "restarts").iterdir()) == ["r0", "r1"]
    # resumed, not refitted: the finished checkpoints were read, never written again
    assert all((out / "em" / "restarts" / r / "kept.txt").exists() for r in ("r0", "r1"))
