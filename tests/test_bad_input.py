"""Bad input the CLI reads is one `error: ...` line and exit code 2, never a traceback.

One table: each case writes a few tiny files under tmp_path, runs `main(argv)` in-process and
names a fragment of the expected message. The damaged reference cache (not a CLI input) is
dropped with a warning; a real bug still raises.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from emdpo_plugin.cli import main

ROW = '{"annotator_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"%s}\n'
OK_ROW = ROW % ""


def bomb(levels: int = 9) -> str:
    """Billion laughs: 9 aliases of 9 aliases of ... (9**levels nodes once expanded)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def parquet(rows: list[dict] | None = None, damage: Callable[[bytes], bytes] | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows or [{"annotator_id": "a", "prompt": f"p{i}", "chosen": "x" * 40,
                                               "rejected": "y"} for i in range(50)])
        pq.write_table(table if rows != [] else table.slice(0, 0), path)
        if damage is not None:
            path.write_bytes(damage(path.read_bytes()))
    return write


def flip_middle(data: bytes) -> bytes:
    mid = len(data) // 3
    return data[:mid] + bytes(b ^ 0xA5 for b in data[mid:mid + 40]) + data[mid + 40:]


def routing(**over: Any) -> str:
    import yaml

    doc = {"format": "emdpo-routing/v1", "base_model": "m", "adapter_type": "lora",
           "adapters": [{"name": "a", "path": "adapters/a", "weight": 1.0}]}
    doc.update(over)
    return yaml.safe_dump(doc)


ADAPTER = {"adapters/a/.keep": ""}
STAGE = {**ADAPTER, "routing.yaml": routing()}  # a finished minmax stage, less its game.npz


def game(L: Any) -> Callable[[Path], None]:
    return lambda path: np.savez(path, L=np.asarray(L, dtype=float))


# (case id, files under tmp_path, argv ({d} is tmp_path), expected fragment of the one line)
CASES: list[tuple[str, dict[str, Any], list[str], str]] = [
    # --- recipes -----------------------------------------------------------------------------
    ("recipe alias bomb", {"r.yaml": "name: x\nmodel:\n  " + bomb().replace("\n", "\n  ")},
     ["run", "{d}/r.yaml", "--dry-run"], "expands to more than 100000 nodes"),
    ("recipe recursive alias", {"r.yaml": "name: x\nmodel: &m {self: *m}\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "alias inside the node it names"),
    ("recipe invalid UTF-8", {"r.yaml": b"name: x\nmodel: {a: \xff}\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "invalid UTF-8: byte 0xff at line 2, column 12"),
    ("recipe nesting depth", {"r.yaml": "name: x\nmodel: " + "[" * 5000 + "]" * 5000 + "\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "nests deeper than 64 levels"),
    ("recipe depth through aliases", {"r.yaml": "name: x\nmodel:\n  a0: &a0 " + "[" * 40 + "]" * 40 + "\n"
                                      "  a1: &a1 " + "[" * 30 + "*a0" + "]" * 30 + "\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "nests deeper than 64 levels (through an alias)"),
    ("recipe larger than 1 MiB", {"r.yaml": "name: x\n" + "#" * (1 << 20) + "\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "larger than 1048576 bytes"),
    ("recipe top level a list", {"r.yaml": "- name: x\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "expected a mapping at the top level, got a list"),
    ("recipe top level a string", {"r.yaml": "just text\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "expected a mapping at the top level, got str"),
    ("recipe empty", {"r.yaml": ""},
     ["run", "{d}/r.yaml", "--dry-run"], "expected a mapping at the top level, got nothing"),
    ("recipe duplicate key", {"r.yaml": "name: x\nmodel: {}\nname: y\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "duplicate key 'name'"),
    ("recipe is a folder", {"r.yaml/x": ""},
     ["run", "{d}/r.yaml", "--dry-run"], "cannot read"),
    ("extends outside the folder", {"base.yaml": "name: b\n", "sub/r.yaml": "extends: ../base.yaml\nname: x\n"},
     ["run", "{d}/sub/r.yaml", "--dry-run"], "is outside the recipe's folder"),
    ("extends an absolute path", {"r.yaml": "extends: /etc/hostname\nname: x\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "is an absolute path; pass --allow-extends-outside"),
    ("extends a bad parent", {"sub/base.yaml": b"name: \xfe\n", "r.yaml": "extends: sub/base.yaml\nname: x\n"},
     ["run", "{d}/r.yaml", "--dry-run"], "base.yaml: invalid UTF-8"),
    ("--set alias bomb", {"r.yaml": "name: x\n"},
     ["run", "{d}/r.yaml", "--dry-run", "--set", "model.x={" + bomb(7).replace("\n", ", ").rstrip(", ") + "}"],
     "expands to more than 100000 nodes"),
    ("--output-dir is a file", {"r.yaml": "name: x\ndata: {builder: bandit}\nstages: [{name: data, trainer: data}]\n",
                                "afile": ""},
     ["run", "{d}/r.yaml", "--output-dir", "{d}/afile"], "afile: cannot use as the run folder"),
    ("--seeds huge range", {"r.yaml": "name: x\n"},
     ["run", "{d}/r.yaml", "--seeds", "0-99999999999999", "-o", "{d}/out"], "at most 1000 seeds"),
    ("--seeds past numpy's bound", {"r.yaml": "name: x\n"},
     ["run", "{d}/r.yaml", "--seeds", "4294967296", "-o", "{d}/out"], "each at most 4294967295"),
    # --- data build --config ---------------------------------------------------------------------
    ("builder config alias bomb", {"c.yaml": bomb()},
     ["data", "build", "bandit", "--config", "{d}/c.yaml", "--out", "{d}/o"], "expands to more than 100000 nodes"),
    ("builder config invalid UTF-8", {"c.yaml": b"annotators: 1\xc3\n"},
     ["data", "build", "bandit", "--config", "{d}/c.yaml", "--out", "{d}/o"], "invalid UTF-8: byte 0xc3 at line 1"),
    ("builder config NaN", {},
     ["data", "build", "bandit", "--set", "noise_std=.nan", "--out", "{d}/o"],
     "config key 'noise_std': expected a finite number, got nan"),
    # --- datasets --------------------------------------------------------------------------------
    ("jsonl invalid UTF-8", {"d.jsonl": OK_ROW.encode() + b'{"prompt": "\xff"}\n'},
     ["data", "validate", "{d}/d.jsonl"], "d.jsonl: line 2: invalid UTF-8: byte 0xff at column 13"),
    ("jsonl nesting past the recursion limit", {"d.jsonl": ROW % (', "m": ' + "[" * 100_000 + "]" * 100_000)},
     ["data", "validate", "{d}/d.jsonl"], "row 1: nests deeper than 64 levels"),
    ("jsonl nesting past 64 levels", {"d.jsonl": ROW % (', "m": ' + "[" * 65 + "]" * 65)},
     ["data", "validate", "{d}/d.jsonl"], "row 1: nests deeper than 64 levels"),
    ("jsonl empty file", {"d.jsonl": ""}, ["data", "validate", "{d}/d.jsonl"], "d.jsonl: no comparisons"),
    ("jsonl blank lines only", {"d.jsonl": "\n  \n\n"}, ["data", "validate", "{d}/d.jsonl"], "no comparisons"),
    ("jsonl duplicate key", {"d.jsonl": ROW % ', "prompt": "q"'},
     ["data", "validate", "{d}/d.jsonl"], "row 1: duplicate key 'prompt'"),
    ("jsonl NaN", {"d.jsonl": ROW % ', "score": NaN'}, ["data", "validate", "{d}/d.jsonl"], "non-finite number NaN"),
    ("jsonl -Infinity", {"d.jsonl": ROW % ', "score": -Infinity'},
     ["data", "validate", "{d}/d.jsonl"], "non-finite number -Infinity"),
    ("jsonl 1e999", {"d.jsonl": OK_ROW + ROW % ', "score": 1e999'},
     ["data", "validate", "{d}/d.jsonl"], "row 2: non-finite number 1e999"),
    ("jsonl 5000-digit integer", {"d.jsonl": ROW % (', "n": ' + "9" * 5000)},
     ["data", "validate", "{d}/d.jsonl"], "row 1: Exceeds the limit"),
    ("parquet not parquet", {"d.parquet": b"PAR1 garbage"},
     ["data", "validate", "{d}/d.parquet"], "d.parquet: cannot read parquet file"),
    ("parquet truncated", {"d.parquet": parquet(damage=lambda b: b[: len(b) // 2])},
     ["data", "validate", "{d}/d.parquet"], "d.parquet: cannot read parquet file"),
    ("parquet damaged page", {"d.parquet": parquet(damage=flip_middle)},
     ["data", "validate", "{d}/d.parquet"], "d.parquet: cannot read parquet file at row 1"),
    ("parquet no rows", {"d.parquet": parquet([])}, ["data", "validate", "{d}/d.parquet"], "no comparisons"),
    ("parquet NaN extra column", {"d.parquet": parquet([{"annotator_id": "a", "prompt": "p", "chosen": "x",
                                                          "rejected": "y", "score": float("nan")}])},
     ["data", "validate", "{d}/d.parquet"], "field 'score': extra column kept as metadata: expected finite numbers"),
    ("dataset folder empty train", {"ds/train.jsonl": "", "ds/test.jsonl": OK_ROW},
     ["data", "validate", "{d}/ds"], "train.jsonl: no comparisons"),
    ("manifest duplicate key", {"ds/train.jsonl": OK_ROW, "ds/manifest.json": '{"format": 1, "format": 2}'},
     ["data", "validate", "{d}/ds"], "manifest.json: duplicate key 'format'"),
    ("manifest invalid UTF-8", {"ds/train.jsonl": OK_ROW, "ds/manifest.json": b'{"format": "\xff"}'},
     ["data", "validate", "{d}/ds"], "manifest.json: invalid UTF-8"),
    # --- routing configs (serve) -------------------------------------------------------------------
    ("routing adapter_type", {**ADAPTER, "routing.yaml": routing(adapter_type="qlora")},
     ["serve", "{d}/routing.yaml"], "adapter_type: expected one of 'lora' or 'full', got 'qlora'"),
    ("routing name reads as a flag", {**ADAPTER, "routing.yaml": routing(
        adapters=[{"name": "--trust-remote-code", "path": "adapters/a", "weight": 1.0}])},
     ["serve", "{d}/routing.yaml"], "adapters.0.name: '--trust-remote-code': expected letters"),
    ("routing name '..'", {**ADAPTER, "routing.yaml": routing(adapters=[{"name": "..", "path": "adapters/a",
                                                                         "weight": 1.0}])},
     ["serve", "{d}/routing.yaml"], "adapters.0.name"),
    ("routing name 'ensemble'", {**ADAPTER, "routing.yaml": routing(
        adapters=[{"name": "ensemble", "path": "adapters/a", "weight": 1.0}])},
     ["serve", "{d}/routing.yaml"], "the router's name for the whole mixture"),
    ("routing base_model reads as a flag", {**ADAPTER, "routing.yaml": routing(base_model="-m")},
     ["serve", "{d}/routing.yaml"], "base_model: '-m': expected a model path"),
    ("routing NaN weight", {**ADAPTER, "routing.yaml": routing().replace("weight: 1.0", "weight: .nan")},
     ["serve", "{d}/routing.yaml"], "adapters.0.weight: expected a finite number, got nan"),
    ("routing alias bomb", {"routing.yaml": bomb()}, ["serve", "{d}/routing.yaml"], "expands to more than"),
    ("routing invalid UTF-8", {"routing.yaml": b"base_model: \xff\n"}, ["serve", "{d}/routing.yaml"], "invalid UTF-8"),
    ("routing top level a list", {"routing.yaml": "- 1\n"}, ["serve", "{d}/routing.yaml"], "routing.yaml: config: expected mapping, got [1]"),
    ("adapter_config.json not a mapping", {"adapters/a/adapter_config.json": "[8]", "routing.yaml": routing()},
     ["serve", "{d}/routing.yaml"], "adapter_config.json: not a PEFT LoRA adapter config"),
    ("serve --port", {}, ["serve", "{d}/routing.yaml", "--port", "70000"], "--port: expected a port number"),
    ("serve --startup-timeout", {}, ["serve", "{d}/routing.yaml", "--startup-timeout", "nan"],
     "--startup-timeout: expected a finite positive number"),
    # --- export ------------------------------------------------------------------------------------
    ("export --priority NaN", {}, ["export", "{d}", "--priority", "nan", "--out", "{d}/o"],
     "--priority: expected finite numbers, got 'nan'"),
    ("export --priority inf", {}, ["export", "{d}", "--priority", "1,inf", "--out", "{d}/o"],
     "--priority: expected finite numbers, got '1,inf'"),
    ("export --priority 0", {**STAGE, "game.npz": game([[0.0]])},
     ["export", "{d}", "--priority", "0", "--out", "{d}/o"], "--priority: expected 1 positive numbers"),
    ("export --priority -1", {**STAGE, "game.npz": game([[0.0]])},
     ["export", "{d}", "--priority=-1", "--out", "{d}/o"], "--priority: expected 1 positive numbers"),
    ("export --eta 0", {}, ["export", "{d}", "--priority", "1", "--eta", "0", "--out", "{d}/o"],
     "--eta: expected a finite positive number"),
    ("export --steps 0", {}, ["export", "{d}", "--priority", "1", "--steps", "0", "--out", "{d}/o"],
     "--steps: expected a positive integer"),
    ("export damaged game.npz", {**STAGE, "game.npz": b"PK\x03\x04 cut short"},
     ["export", "{d}", "--priority", "1", "--out", "{d}/o"], "game.npz: cannot read"),
    ("export non-finite L", {**STAGE, "game.npz": game([[np.nan]])},
     ["export", "{d}", "--priority", "1", "--out", "{d}/o"], "game.npz: L holds non-finite values"),
]


def write_files(root: Path, files: dict[str, Any]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.fixture(scope="module")
def imported() -> None:
    """Import what the commands import, so a case's time is its own work."""
    import emdpo_plugin.data.validate  # noqa: F401
    import emdpo_plugin.export.reweight  # noqa: F401
    import emdpo_plugin.recipe.loader  # noqa: F401


@pytest.mark.parametrize("name, files, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path: Path, capsys, imported, name, files, argv, expected) -> None:
    write_files(tmp_path, files)
    start = time.perf_counter()
    rc = main([a.replace("{d}", str(tmp_path)) for a in argv])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "Traceback" not in err, err
    assert elapsed < (1 if "bomb" in name else 10), f"{elapsed:.1f}s"
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_alias_bomb_is_refused_quickly() -> None:
    from emdpo_plugin.errors import EmdpoError
    from emdpo_plugin.safe_yaml import load_yaml

    start = time.perf_counter()
    with pytest.raises(EmdpoError, match="expands to more than"):
        load_yaml(bomb(), "bomb.yaml")
    assert time.perf_counter() - start < 0.5


def test_extends_outside_is_allowed_when_asked(tmp_path: Path, monkeypatch) -> None:
    from emdpo_plugin.recipe.loader import load_recipe

    write_files(tmp_path, {"base.yaml": "name: b\nseed: 3\n", "sub/r.yaml": "extends: ../base.yaml\nname: x\n"})
    assert load_recipe(tmp_path / "sub" / "r.yaml", allow_extends_outside=True)["seed"] == 3
    monkeypatch.setenv("EMDPO_ALLOW_EXTENDS_OUTSIDE", "1")
    assert load_recipe(tmp_path / "sub" / "r.yaml")["seed"] == 3


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2], lambda b: b[:30], lambda b: b[:-10], lambda b: b"", lambda b: b"not a zip",
    lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:160]) + b[160:],
], ids=["half", "head", "tail cut", "empty", "garbage", "flipped"])
def test_damaged_reference_cache_is_dropped_with_a_warning(tmp_path: Path, caplog, damage) -> None:
    from emdpo_plugin.backends.ref_cache import load_entries, save_entries

    path = tmp_path / "cache" / "ref_logps-x.npz"
    cache = {"c1": np.array([-1.5, -2.0]), "c2": np.array([-0.5, -3.0, -4.0])}
    save_entries(path, cache)
    assert {k: v.tolist() for k, v in load_entries(path).items()} == {k: v.tolist() for k, v in cache.items()}
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level("WARNING", logger="emdpo_plugin"):
        loaded = load_entries(path)
    if loaded:  # a cut that spared every array is still a good cache
        assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in cache.items()}
    else:
        assert "damaged reference log-prob cache dropped" in caplog.text


def test_reference_cache_of_wrong_shape_or_pickles_is_dropped(tmp_path: Path, caplog) -> None:
    from emdpo_plugin.backends.ref_cache import load_entries

    for name, arrays in {"2d": {"c": np.zeros((2, 2))}, "ints": {"c": np.arange(3)}, "nan": {"c": np.array([np.nan])},
                         "pickle": {"c": np.array([{"a": 1}], dtype=object)}}.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with caplog.at_level("WARNING", logger="emdpo_plugin"):
            assert load_entries(path) == {}, name
    assert caplog.text.count("dropped") == 4


def test_a_real_bug_still_shows_its_traceback(monkeypatch) -> None:
    import emdpo_plugin.cli as cli

    def broken(args):  # not an EmdpoError: a bug, which must not be hidden as a user error
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(cli, "cmd_data_validate", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["data", "validate", "x.jsonl"])
