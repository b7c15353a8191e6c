"""Data people already have: column mapping, integer ids, extra columns as metadata,
message-list (chat) prompts, save_to_disk folders and hub ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emdpo_plugin.cli import main
from emdpo_plugin.data.chat import CHAT, PLAIN, ChatMessages, TemplateOnly, render_pair, render_prompt
from emdpo_plugin.data.io import load_dataset_dir, read_comparisons, write_jsonl, write_parquet
from emdpo_plugin.data.keys import DataKeys, parse_keys
from emdpo_plugin.data.sources import read_source
from emdpo_plugin.data.validate import validate_path
from emdpo_plugin.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
KEYS = "prompt=question,chosen=good,rejected=bad,annotator=user"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _user_rows(n: int = 6) -> list[dict]:
    return [{"question": f"question {i}?", "good": f"good answer {i}", "bad": f"bad answer {i}",
             "user": i % 3, "source": "forum" if i % 2 else "web"} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- column mapping, ids, metadata


def test_cli_validate_with_keys_names_the_extra_column(tmp_path, capsys):
    path = _jsonl(tmp_path / "mine.jsonl", _user_rows())
    assert main(["data", "validate", str(path), "--keys", KEYS]) == 0
    out = capsys.readouterr().out
    assert "6 comparisons" in out and "3 annotators" in out and "prompts: plain" in out
    assert "extra columns kept as metadata: source" in out and f"with keys {KEYS}" in out
    assert main(["data", "validate", str(path)]) == 2  # without the mapping: the first missing field
    err = capsys.readouterr().err
    assert err == f"error: {path}: row 1: field 'annotator_id': required field missing (expected a string or integer id)\n"
    assert main(["data", "validate", str(path), "--keys", "prompt=question,answer=good"]) == 2
    assert "--keys: unknown field(s) answer (expected prompt, chosen," in capsys.readouterr().err


def test_mapped_rows_are_canonical_with_string_ids_and_meta(tmp_path):
    (row, *_) = read_comparisons(_jsonl(tmp_path / "d.jsonl", _user_rows()), keys=parse_keys(KEYS))
    assert (row.annotator_id, row.prompt, row.responses, row.ranking) == ("0", "question 0?", ["good answer 0", "bad answer 0"], [0, 1])
    assert row.meta == {"source": "web"}
    assert row.to_record()["meta"] == {"source": "web"} and "question" not in row.to_record()


@pytest.mark.parametrize("change, message", [
    ({"user": [1, 2]}, "row 2: field 'user' (annotator_id): expected a string or integer id, found list [1, 2]"),
    ({"user": {"id": 1}}, "row 2: field 'user' (annotator_id): expected a string or integer id, found object"),
    ({"user": False}, "row 2: field 'user' (annotator_id): expected a string or integer id, found boolean False"),
    ({"question": None}, "row 2: field 'question' (prompt): expected a string or a message list, found null"),
    ({"prompt": "also"}, "row 2: field 'prompt': also given by column 'question' (keys prompt=question)"),
    ({"meta": {"source": "x"}}, "row 2: field 'source': also a key of the row's 'meta' object"),
])
def test_mapped_row_errors_name_the_users_column(tmp_path, change, message):
    rows = _user_rows(2)
    rows[1].update(change)
    msg = _error(read_comparisons, _jsonl(tmp_path / "d.jsonl", rows), keys=parse_keys(KEYS))
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}: {message}"), msg


def test_numeric_ids_keep_their_string_form(tmp_path):
    rows = [{"annotator_id": a, "prompt": "p", "chosen": f"x{i}", "rejected": "y", "group": g}
            for i, (a, g) in enumerate([(7, 1), (7.0, 1.0), ("u", "g"), (2.5, 0)])]
    got = [(r.annotator_id, r.group) for r in read_comparisons(_jsonl(tmp_path / "d.jsonl", rows))]
    assert got == [("7", "1"), ("7", "1"), ("u", "g"), ("2.5", "0")]


def test_keys_model_refuses_unknown_and_doubly_mapped():
    with pytest.raises(Exception, match="prmpt"):
        DataKeys.model_validate({"prmpt": "q"})
    assert _error(DataKeys(prompt="q", chosen="q").column_map) == "data.keys: column 'q' is mapped twice (prompt and chosen)"
    assert _error(parse_keys, "prompt") == "--keys: expected FIELD=COLUMN pairs separated by commas, found 'prompt'"


def _recipe(tmp_path: Path, data: dict) -> Path:
    import yaml

    recipe = {"name": "mine", "output_dir": str(tmp_path / "run"), "data": data,
              "stages": [{"name": "data", "trainer": "data"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_data_stage_maps_keys_and_keeps_meta(tmp_path):
    src = _jsonl(tmp_path / "mine.jsonl", _user_rows())
    keys = dict(p.split("=") for p in KEYS.split(","))
    assert main(["run", str(_recipe(tmp_path, {"path": str(src), "keys": keys}))]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    assert set(lines[1]) == {"comparison_id", "annotator_id", "prompt", "responses", "ranking", "meta"}
    assert lines[1]["annotator_id"] == "1" and lines[1]["responses"] == ["good answer 1", "bad answer 1"]
    assert lines[1]["meta"] == {"source": "forum"}
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["text_format"] == PLAIN and manifest["builder"]["config"]["keys"] == keys
    outputs = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["data"]["outputs"]
    assert outputs["text_format"] == PLAIN and outputs["meta_columns"] == ["source"] and outputs["train"] == 6


def test_unknown_data_keys_fail_the_dry_run(tmp_path, capsys):
    recipe = _recipe(tmp_path, {"path": "x.jsonl", "keys": {"prmpt": "question"}})
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.keys.prmpt" in err


# ---------------------------------------------------------------- save_to_disk folders and hub ids


def test_save_to_disk_datasetdict_splits_and_keys(tmp_path, capsys):
    import datasets

    rows = _user_rows(9)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]),
                               "validation": datasets.Dataset.from_list(rows[5:7]),
                               "test": datasets.Dataset.from_list(rows[7:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    splits = read_source(str(tmp_path / "saved"), parse_keys(KEYS))
    assert {s: len(r) for s, (_, r) in splits.items()} == {"train": 5, "val": 2, "test": 2}
    assert splits["val"][1][0].meta == {"source": "forum"}
    assert main(["data", "validate", str(tmp_path / "saved"), "--keys", KEYS]) == 0
    assert "saved[validation] (2 rows)" in capsys.readouterr().out
    # the data stage writes it as a canonical dataset folder with its val and test splits
    assert main(["run", str(_recipe(tmp_path, {"path": str(tmp_path / "saved"),
                                                "keys": dict(p.split("=") for p in KEYS.split(","))}))]) == 0
    ds = load_dataset_dir(tmp_path / "run" / "data")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (5, 2, 2)
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "odd"))
    assert "holds splits [train_prefs]; expected train (required), validation (or val) and test" in \
        _error(read_source, str(tmp_path / "odd"))


def test_hub_id_offline_is_a_one_line_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "emdpo_plugin", "data", "validate", "nobody-here/no-such-dataset"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("error: nobody-here/no-such-dataset: no such local file or folder, "
                                              "and as a hub dataset id it cannot be loaded (HF_HUB_OFFLINE is set")


# ---------------------------------------------------------------- chat prompts


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A tiny BPE tokenizer built offline (as models/tiny.py does) with a simple chat template."""
    from emdpo_plugin.models.tiny import _train_tokenizer

    tok = _train_tokenizer(["<|user|> hello there", "<|assistant|> general kenobi"] * 4, 300, 128)
    tok.chat_template = TEMPLATE
    return tok


def _chat_rows() -> list[dict]:
    system = {"role": "system", "content": "be brief"}
    return [{"annotator_id": "a", "prompt": [system, {"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away", "topic": "greeting"},
            {"annotator_id": "b", "prompt": [{"role": "user", "content": "bye", "name": None}],
             "responses": ["see you", "whatever", [{"role": "assistant", "content": "ciao"}]], "ranking": [2, 0]}]


def test_message_lists_parse_round_trip_and_render(tmp_path, chat_tokenizer):
    rows = read_comparisons(_jsonl(tmp_path / "chat.jsonl", _chat_rows()))
    assert all(isinstance(r.prompt, ChatMessages) for r in rows)
    assert rows[1].prompt.messages == [{"role": "user", "content": "bye"}]  # null fields dropped
    assert isinstance(rows[0].responses[0], ChatMessages) and rows[0].responses[1] == "go away"
    write_jsonl(rows, tmp_path / "back.jsonl")
    assert read_comparisons(tmp_path / "back.jsonl") == rows
    assert json.loads((tmp_path / "back.jsonl").read_text().splitlines()[0])["prompt"][0] == {"role": "system", "content": "be brief"}
    assert _error(write_parquet, rows, tmp_path / "c.parquet").endswith("message lists are written as JSON Lines only (write_jsonl)")

    assert render_prompt(chat_tokenizer, rows[0].prompt) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert render_pair(chat_tokenizer, rows[0].prompt, rows[0].responses[0]) == (
        "<|system|>be brief\n<|user|>hi\n<|assistant|>", "hello\n")
    assert render_pair(chat_tokenizer, rows[0].prompt, "go away")[1] == "go away\n"  # a string is one assistant turn
    assert render_pair(chat_tokenizer, "plain ", "text") == ("plain ", "text")  # plain text passes through
    # the tokenizer-free renderer (the tiny model's SFT texts) renders exactly as the tokenizer does
    assert render_pair(TemplateOnly(TEMPLATE), rows[1].prompt, rows[1].responses[2]) == \
        render_pair(chat_tokenizer, rows[1].prompt, rows[1].responses[2])


def test_the_backend_tokenizes_chat_through_the_template(chat_tokenizer):
    """Training and scoring share `_tokenize`: rendered prompt + response + eos, prompt tokens counted."""
    from types import SimpleNamespace

    from emdpo_plugin.backends.openrlhf_backend import OpenRLHFBackend
    from emdpo_plugin.host.compat import apply_cpu_compat

    apply_cpu_compat()  # what the backend does first: OpenRLHF imports without flash-attn on CPU
    be = OpenRLHFBackend.__new__(OpenRLHFBackend)
    be.tokenizer, be.cfg, be._tokens = chat_tokenizer, SimpleNamespace(max_len=128), {}
    prompt = ChatMessages.of([{"role": "user", "content": "hello there"}])
    t = be._tokenize(prompt, "general kenobi")
    text = chat_tokenizer.decode(t.input_ids[0])
    assert text == "<|user|>hello there\n<|assistant|>general kenobi </s>"
    head = chat_tokenizer("<|user|>hello there\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert t.prompt_len == len(head)


def test_chat_errors_are_one_line(tmp_path, chat_tokenizer):
    from emdpo_plugin.models.tiny import _train_tokenizer

    no_template = _train_tokenizer(["hello there"] * 4, 300, 64)
    no_template.chat_template = None
    prompt = ChatMessages.of([{"role": "user", "content": "hi"}])
    assert "has no chat_template, but the prompt is a message list (text_format chat_template)" in \
        _error(render_prompt, no_template, prompt)
    rows = _chat_rows()
    mixed = _jsonl(tmp_path / "mixed.jsonl", [rows[0], {**rows[0], "prompt": "plain", "chosen": "x", "annotator_id": "c"}])
    assert _error(read_comparisons, mixed).endswith(
        "row 2: field 'prompt': expected a message list like row 1 (one text format per file: "
        "all prompts plain strings or all message lists)")
    plain_prompt = _jsonl(tmp_path / "p.jsonl", [{**rows[0], "prompt": "plain"}])
    assert "field 'chosen': expected a string (message-list responses need a message-list prompt)" in \
        _error(read_comparisons, plain_prompt)
    bad = _jsonl(tmp_path / "b.jsonl", [{**rows[0], "prompt": [{"role": "user"}]}])
    assert "field 'prompt': expected a string or a message list, found message 0 has no string 'content'" in \
        _error(read_comparisons, bad)


def test_dataset_records_its_text_format(tmp_path):
    from emdpo_plugin.data.io import write_dataset_dir
    from emdpo_plugin.data.manifest import build_manifest

    chat = read_comparisons(_jsonl(tmp_path / "chat.jsonl", _chat_rows()))
    plain = read_comparisons(_jsonl(tmp_path / "plain.jsonl", _user_rows(2)), keys=parse_keys(KEYS))
    assert build_manifest(chat, None, builder="b", config={})["text_format"] == CHAT
    write_dataset_dir(tmp_path / "ds", chat, None, build_manifest(chat, None, builder="b", config={}))
    assert load_dataset_dir(tmp_path / "ds").text_format == CHAT
    assert "prompts: chat_template" in validate_path(tmp_path / "ds").summary()
    write_jsonl(plain, tmp_path / "ds" / "test.jsonl")
    assert _error(load_dataset_dir, tmp_path / "ds").endswith(
        "test.jsonl: row 1: field 'prompt': expected a message list like the prompts of train.jsonl "
        "(every split of a dataset has one text format)")


@pytest.mark.slow
def test_chat_dataset_trains_a_tiny_dpo_fit(tiny_model, tmp_path):
    """Message-list prompts through the tiny model's chat template: one weighted DPO fit moves the margin."""
    import numpy as np

    from emdpo_plugin.backends.openrlhf_backend import OpenRLHFBackend
    from emdpo_plugin.data.schema import ComparisonSet

    rows = [{"annotator_id": f"a{i % 4}", "comparison_id": f"c{i}", "prompt": [{"role": "user", "content": f"review {i % 8}: it was"}],
             "chosen": " a great and moving film", "rejected": " a dull and boring film"} for i in range(32)]
    data = ComparisonSet(read_comparisons(_jsonl(tmp_path / "chat.jsonl", rows)))
    assert data.text_format == CHAT
    be = OpenRLHFBackend({"pretrain": str(tiny_model), "max_len": 64, "lora": {"rank": 0},
                          "train": {"lr": 1e-3, "micro_batch_size": 8, "batch_size": 8, "lr_warmup_steps": 1}},
                         seed=0, run_dir=tmp_path)
    assert be._tokenize(data.prompts[0], data.responses[0][0]).prompt_len > 0
    policy = be.new_policy(1)

    def margin() -> float:
        s = be.score(policy, data.prompts, data.responses)
        return float(np.mean(s[:, 0] - s[:, 1]))

    before = margin()
    stats = be.fit(policy, data, np.ones(len(data)), warm=False)
    assert stats["rows"] == 32 and stats["steps"] == 4
    assert margin() > before + 1.0


def test_mapped_columns_train_in_a_recipe(tmp_path):
    """The user's own columns (`question`, `good`, `bad`, integer `user`, extra `source`) go
    through a recipe's `data.keys` into training: DPO and a 2-type EM on the bandit backend,
    whose prompts are contexts and responses arms."""
    import numpy as np
    import yaml

    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        user, context = i % 8, [round(float(x), 3) for x in rng.uniform(size=3)]
        good, bad = ("arm0", "arm1") if user < 4 else ("arm1", "arm0")  # two tastes among the users
        rows.append({"question": json.dumps(context), "good": good, "bad": bad, "user": user, "source": "web"})
    src = _jsonl(tmp_path / "mine.jsonl", rows)
    keys = dict(p.split("=") for p in KEYS.split(","))
    recipe = {"name": "mine", "output_dir": str(tmp_path / "run"),
              "model": {"backend": "bandit", "epochs": 40, "warm_epochs": 10},
              "data": {"path": str(src), "keys": keys},
              "stages": [{"name": "data", "trainer": "data"},
                         {"name": "dpo", "trainer": "dpo", "inputs": {"dataset": "data"}},
                         {"name": "em", "trainer": "em_dpo", "inputs": {"dataset": "data"},
                          "config": {"K": 2, "iterations": 2, "seeding": "annotator"}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 0
    stages = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]
    assert stages["dpo"]["outputs"]["fit"]["rows"] == 48
    clustering = json.loads((tmp_path / "run" / "em" / "clustering.json").read_text())
    assert sorted(clustering["annotator_ids"]) == [str(u) for u in range(8)]
    types = np.array(clustering["responsibilities"]).argmax(1)
    by_user = dict(zip(clustering["annotator_ids"], types))
    assert len({by_user[str(u)] for u in range(4)}) == 1 and len({by_user[str(u)] for u in range(4, 8)}) == 1
    assert by_user["0"] != by_user["4"]  # the two tastes found from the mapped columns
