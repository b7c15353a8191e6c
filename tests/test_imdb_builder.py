"""imdb_synthetic (data_builders/imdb_synthetic/) and `openrlhf data build`.

The acceptance build (1,200 users x 50 pairs from the offline generated source) runs once per
module through the real console script; the other tests use small in-process builds. HF and
file sources are exercised on data made here (no hub access).
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_builders import imdb_synthetic as imdb
from data_builders.labellers import HarperGrammar
from emdpo_plugin import cli
from emdpo_plugin.data.io import read_comparisons
from emdpo_plugin.data.validate import validate_path
from emdpo_plugin.errors import EmdpoError

OPENRLHF = str(Path(sys.executable).with_name("openrlhf"))
SMALL = {"users": 30, "pairs_per_user": 8, "test_size": 16, "progress": False,
         "source": {"kind": "generated", "pool_size": 120}}


def _small(**over) -> dict:
    cfg = json.loads(json.dumps(SMALL))
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([OPENRLHF, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


# --------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def paper_scale(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imdbgen") / "data"
    proc = _run("data", "build", "imdb_synthetic", "--set", "source.kind=generated", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "60000 train" in proc.stdout
    return out


@pytest.mark.slow
def test_acceptance_counts_groups_and_test_split(paper_scale: Path) -> None:
    train = read_comparisons(paper_scale / "train.jsonl")
    test = read_comparisons(paper_scale / "test.jsonl")
    assert len(train) == 60_000
    per_user = collections.Counter(r.annotator_id for r in train)
    assert len(per_user) == 1200 and set(per_user.values()) == {50}
    groups = {}
    for r in train:
        assert groups.setdefault(r.annotator_id, r.group) == r.group  # one group per annotator
    assert collections.Counter(groups.values()) == {"sentiment": 800, "grammar": 400}
    # each user's 50 pairs are distinct items
    by_user = collections.defaultdict(set)
    for r in train:
        by_user[r.annotator_id].add((r.prompt, tuple(r.responses)))
    assert all(len(v) == 50 for v in by_user.values())
    # 256 test prompts, each labelled once by each group, none of them in train
    by_prompt = collections.defaultdict(dict)
    for r in test:
        assert r.annotator_id == f"test-{r.group}" and r.split == "test"
        by_prompt[r.prompt][r.group] = r
    assert len(by_prompt) == 256 and all(set(v) == {"sentiment", "grammar"} for v in by_prompt.values())
    assert not set(by_prompt) & {r.prompt for r in train}
    disagree = np.mean([v["sentiment"].ranking != v["grammar"].ranking for v in by_prompt.values()])
    assert disagree >= 0.25
    # several thousand distinct training prompts
    assert len({r.prompt for r in train}) >= 3000


@pytest.mark.slow
def test_acceptance_manifest_and_validation(paper_scale: Path) -> None:
    report = validate_path(paper_scale)
    assert report.manifest and report.rows_per_file == {"train.jsonl": 60_000, "val.jsonl": 512, "test.jsonl": 512}
    m = json.loads((paper_scale / "manifest.json").read_text())
    assert m["builder"]["name"] == "imdb_synthetic"
    assert m["builder"]["config"]["source"]["kind"] == "generated" and m["builder"]["config"]["seed"] == 0
    assert m["counts"]["annotators"] == 1200
    assert m["counts"]["comparisons"] == {"train": 60_000, "test": 512, "val": 512}
    assert m["disjoint_prompts"] == ["train", "val", "test"]
    assert m["counts"]["groups"] == {"grammar": 400, "sentiment": 800}
    assert m["labels"]["grammar"]["engine"] == "harper" and m["labels"]["grammar"]["version"]
    assert m["labels"]["sentiment"]["engine"] == "vader" and m["labels"]["sentiment"]["version"]
    assert m["source"]["synthetic"] is True and m["synthetic"]["text"] is True
    assert m["disagreement"]["test"]["top1"] >= 0.25
    ties = m["ties"]
    assert "coin" in ties["rule"]
    for split in ("train_items", "test_items", "val_items"):
        for g in ("sentiment", "grammar"):
            t = ties[split][g]
            assert t["tied_items"] == t["broken_by_other"] + t["broken_by_coin"]
    assert m["content_hash"]


# --------------------------------------------------------------------------- small builds


def test_group_counts_are_exact() -> None:
    assert imdb.group_counts(1200, {"sentiment": 2 / 3, "grammar": 1 / 3}) == {"sentiment": 800, "grammar": 400}
    assert imdb.group_counts(10, {"sentiment": 2 / 3, "grammar": 1 / 3}) == {"sentiment": 7, "grammar": 3}
    assert sum(imdb.group_counts(7, {"sentiment": 0.5, "grammar": 0.5}).values()) == 7


def test_small_generated_build_is_deterministic_and_well_formed() -> None:
    a = imdb.build(_small(), seed=3)
    b = imdb.build(_small(), seed=3)
    c = imdb.build(_small(), seed=4)
    rows = lambda d: [r.to_record() for r in d.train + d.test]  # noqa: E731
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert len(a.train) == 30 * 8 and len(a.test) == 16 * 2
    assert collections.Counter(r.group for r in a.train if r.comparison_id.endswith("-000")) == {"sentiment": 20, "grammar": 10}
    for r in a.train:
        assert len(r.responses) == 2 and sorted(r.ranking) == [0, 1]
    assert a.config["seed"] == 3 and a.config["source"]["kind"] == "generated"
    assert a.labels["grammar"]["engine"] == "harper" and a.labels["sentiment"]["engine"] == "vader"
    assert set(a.extra) >= {"source", "ties", "disagreement", "synthetic"}


def test_val_split_is_labelled_by_every_group_and_held_out() -> None:
    """val (default size = test_size) is like test: every prompt by every group, no prompt shared."""
    built = imdb.build(_small(), seed=3)
    assert built.val is not None and len(built.val) == 16 * 2 and built.config["val_size"] == 16
    by_prompt = collections.defaultdict(set)
    for r in built.val:
        assert r.split == "val" and r.annotator_id == f"val-{r.group}" and r.comparison_id.startswith("val-")
        by_prompt[r.prompt].add(r.group)
    assert len(by_prompt) == 16 and all(v == {"sentiment", "grammar"} for v in by_prompt.values())
    train_p, test_p = {r.prompt for r in built.train}, {r.prompt for r in built.test}
    assert not set(by_prompt) & test_p and not set(by_prompt) & train_p
    assert built.disjoint_prompts == ("train", "val", "test")
    assert built.extra["source"]["val_items"] == 16 and "val_items" in built.extra["ties"]
    none = imdb.build(_small(val_size=0), seed=3)
    assert none.val is None and none.config["val_size"] == 0
    bigger = imdb.build(_small(val_size=5), seed=3)
    assert len(bigger.val) == 5 * 2


def test_config_seed_overrides_the_argument() -> None:
    a = imdb.build(_small(seed=9), seed=0)
    b = imdb.build(_small(), seed=9)
    assert [r.to_record() for r in a.train] == [r.to_record() for r in b.train]


def test_labels_follow_the_group_criteria() -> None:
    built = imdb.build(_small(), seed=1)
    harper = HarperGrammar(workers=1)
    from data_builders.labellers import VaderSentiment

    vader = VaderSentiment()
    for r in built.test:
        best, worst = r.responses[r.ranking[0]], r.responses[r.ranking[1]]
        if r.group == "sentiment":
            s = vader.score([best, worst])
            assert s[0] >= s[1]
        else:
            s = harper.score([best, worst])
            assert s[0] >= s[1]


def test_rankings_with_three_responses() -> None:
    built = imdb.build(_small(responses_per_prompt=3), seed=0)
    assert all(len(r.responses) == 3 and sorted(r.ranking) == [0, 1, 2] for r in built.train + built.test)
    assert built.extra["disagreement"]["test"]["full_ranking"] >= built.extra["disagreement"]["test"]["top1"]


def test_rank_with_ties_rule() -> None:
    coin = np.array([0.1, 0.9, 0.5])
    assert imdb.rank_with_ties(np.array([0.3, 0.1, 0.2]), np.array([0, 0, 0.0]), coin) == ([0, 2, 1], None)
    # tie on the primary score broken by the other criterion
    assert imdb.rank_with_ties(np.array([0.0, 0.0, -1.0]), np.array([0.2, 0.7, 0.0]), coin) == ([1, 0, 2], "other")
    # tie on both: the coin decides (higher coin first)
    assert imdb.rank_with_ties(np.array([0.0, 0.0, -1.0]), np.array([0.2, 0.2, 0.0]), coin) == ([1, 0, 2], "coin")
    assert imdb.rank_with_ties(np.array([0.0, 0.0]), None, np.array([0.8, 0.3])) == ([0, 1], "coin")


def test_tie_counts_match_the_rows() -> None:
    built = imdb.build(_small(users=60, pairs_per_user=10), seed=2)
    ties = built.extra["ties"]
    assert ties["train_items"]["grammar"]["tied_items"] > 0  # two error-free completions tie
    assert sum(ties["train_rows"].values()) <= len(built.train)
    coin_only = imdb.build(_small(users=60, pairs_per_user=10, tie_break="coin"), seed=2)
    t = coin_only.extra["ties"]["train_items"]["grammar"]
    assert t["broken_by_other"] == 0 and t["broken_by_coin"] == t["tied_items"]


def test_corpus_errors_are_what_harper_flags() -> None:
    corpus = imdb.ReviewCorpus(0, error_probs=[0.35, 0.3, 0.2, 0.15], levels=[-2, -1, 0, 1, 2])
    items = [corpus.item(2) for _ in range(150)]
    texts = [r for it in items for r in it.responses]
    injected = np.array([k for it in items for k in it.meta["injected_errors"]])
    found = HarperGrammar(workers=1).count_errors(texts)
    assert np.mean(found[injected == 0] == 0) >= 0.95
    assert np.mean(found[injected >= 1] >= 1) >= 0.95
    assert np.corrcoef(injected, found)[0, 1] > 0.9
    assert len({it.prompt for it in items}) == 150


def test_config_errors_name_the_dotted_key() -> None:
    with pytest.raises(EmdpoError, match=r"config key 'source\.colour': unknown key"):
        imdb.build(_small(**{"source.colour": 1}), seed=0)
    with pytest.raises(EmdpoError, match=r"config key 'groups'.*unknown group 'humour'"):
        imdb.build(_small(groups={"humour": 1}), seed=0)
    with pytest.raises(EmdpoError, match="pairs_per_user=500"):
        imdb.build(_small(pairs_per_user=500), seed=0)


def test_group_fractions_accept_strings() -> None:
    built = imdb.build(_small(users=9, groups={"sentiment": "1/3", "grammar": "2/3"}), seed=0)
    assert collections.Counter(r.group for r in built.train if r.comparison_id.endswith("-000")) == {"sentiment": 3, "grammar": 6}


def test_engine_that_cannot_run_fails_before_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LTP_PATH", str(tmp_path / "lt"))
    monkeypatch.delenv("LTP_JAR_DIR_PATH", raising=False)
    with pytest.raises(EmdpoError, match="no local LanguageTool install"):
        imdb.build(_small(**{"grammar.engine": "languagetool"}), seed=0)


# --------------------------------------------------------------------------- hf and file sources


def _pairs_frame(n: int, *, with_prefix: bool) -> pd.DataFrame:
    corpus = imdb.ReviewCorpus(5, error_probs=[0.4, 0.4, 0.2], levels=[-2, -1, 0, 1, 2])
    rows = []
    for _ in range(n):
        it = corpus.item(3)
        a, b, c = it.responses
        rows.append({"text": it.prompt, "chosen": (it.prompt + a) if with_prefix else a,
                     "rejected": (it.prompt + b) if with_prefix else b, "third": c})
    return pd.DataFrame(rows)


def test_hf_source_from_a_local_dataset_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hfdata"
    folder.mkdir()
    _pairs_frame(60, with_prefix=True).to_json(folder / "train.jsonl", orient="records", lines=True)
    _pairs_frame(30, with_prefix=True).iloc[::-1].to_json(folder / "test.jsonl", orient="records", lines=True)
    cfg = _small(source={"kind": "hf", "dataset": str(folder)}, users=10, pairs_per_user=5, test_size=8)
    built = imdb.build(cfg, seed=0)
    assert len(built.train) == 50 and len(built.test) == 16
    assert built.extra["source"]["kind"] == "hf" and built.extra["source"]["synthetic"] is False
    for r in built.train:
        assert not any(resp.startswith(r.prompt) for resp in r.responses)  # prompt prefix stripped
    # save_to_disk folders load too
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(_pairs_frame(40, with_prefix=False))})
    dd.save_to_disk(str(tmp_path / "saved"))
    built = imdb.build(_small(source={"kind": "hf", "dataset": str(tmp_path / "saved"), "split": "train"},
                              users=4, pairs_per_user=5, test_size=4), seed=0)
    assert len(built.train) == 20


def test_hf_source_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _small(source={"kind": "hf", "dataset": str(tmp_path / "missing-folder")})
    with pytest.raises(EmdpoError, match="cannot be loaded.*source.kind=generated"):
        imdb.build(cfg, seed=0)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_source_with_completion_columns(tmp_path: Path, suffix: str) -> None:
    df = _pairs_frame(50, with_prefix=False).rename(columns={"text": "prompt", "chosen": "a", "rejected": "b", "third": "c"})
    path = tmp_path / f"pairs{suffix}"
    {".csv": lambda: df.to_csv(path, index=False),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    cfg = _small(source={"kind": "file", "path": str(path), "prompt_column": "prompt", "completion_columns": ["a", "b", "c"]},
                 users=6, pairs_per_user=5, test_size=5, responses_per_prompt=3)
    built = imdb.build(cfg, seed=0)
    assert len(built.train) == 30 and all(len(r.responses) == 3 for r in built.train)
    prompts = set(df["prompt"])
    assert all(r.prompt in prompts for r in built.train + built.test + built.val)
    with pytest.raises(EmdpoError, match=r"test_size=5 \+ val_size=46 distinct prompts are held out, but the source has only 50"):
        imdb.build({**cfg, "val_size": 46}, seed=0)


def test_file_source_errors(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": ["word " * 30] * 5}).to_csv(path, index=False)
    with pytest.raises(EmdpoError, match="missing column"):
        imdb.build(_small(source={"kind": "file", "path": str(path)}), seed=0)
    with pytest.raises(EmdpoError, match="set generator.model"):
        imdb.build(_small(source={"kind": "file", "path": str(path), "review_column": "review"}), seed=0)
    with pytest.raises(EmdpoError, match="only 2 column"):
        imdb.build(_small(source={"kind": "file", "path": str(path)}, responses_per_prompt=3), seed=0)


def test_first_tokens_strips_markup() -> None:
    review = "I <br /><br />loved   this film.<br />It was " + " ".join(f"w{i}" for i in range(30))
    prompt = imdb.first_tokens(review, 20)
    assert "<" not in prompt and len(prompt.split()) == 20 and prompt.startswith("I loved this film. It was w0")


def _reviews(n: int) -> list[str]:
    corpus = imdb.ReviewCorpus(11, error_probs=[1.0], levels=[-2, -1, 0, 1, 2])
    out = []
    for _ in range(n):
        it = corpus.item(2)
        out.append(it.prompt + "<br /><br />" + it.responses[0].strip() + it.responses[1])
    return out


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    tiny = pytest.importorskip(
        "emdpo_plugin.models.tiny", reason="emdpo_plugin.models.tiny is not available yet (the lead re-enables this)"
    )
    return tiny.build_tiny_lm(_reviews(120), tmp_path_factory.mktemp("tiny") / "lm", seed=0, sft_steps=10)


@pytest.mark.slow
def test_file_source_raw_reviews_with_a_local_model(tmp_path: Path, tiny_lm: Path) -> None:
    path = tmp_path / "reviews.csv"
    reviews = _reviews(40) + ["too short to continue"]
    pd.DataFrame({"review": reviews}).to_csv(path, index=False)
    cfg = _small(source={"kind": "file", "path": str(path), "review_column": "review"},
                 generator={"model": str(tiny_lm), "max_new_tokens": 12, "device": "cpu"},
                 users=5, pairs_per_user=4, test_size=4)
    built = imdb.build(cfg, seed=0)
    assert len(built.train) == 20 and len(built.test) == 8
    expected = {imdb.first_tokens(r, 20) for r in reviews}
    for r in built.train + built.test:
        assert r.prompt in expected and "<br" not in r.prompt and len(r.prompt.split()) == 20
        assert all(resp.strip() for resp in r.responses)
    src = built.extra["source"]
    assert src["dropped"]["review_too_short"] == 1 and src["generator"]["model"] == str(tiny_lm)


@pytest.mark.slow
def test_generator_tiny_calls_build_tiny_lm(tmp_path: Path, tiny_lm: Path, monkeypatch) -> None:
    import emdpo_plugin.models.tiny as tiny

    calls = []

    def fake_build(texts, out_dir, *, seed=0, **kw):
        calls.append((len(texts), out_dir, seed, kw))
        return tiny_lm

    monkeypatch.setattr(tiny, "build_tiny_lm", fake_build)
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": _reviews(30)}).to_csv(path, index=False)
    cfg = _small(source={"kind": "file", "path": str(path), "review_column": "review"},
                 generator={"model": "tiny", "max_new_tokens": 8, "tiny_options": {"sft_steps": 3}},
                 users=3, pairs_per_user=3, test_size=3)
    built = imdb.build(cfg, seed=7)
    assert len(calls) == 1 and calls[0][0] == 30 and calls[0][2] == 7 and calls[0][3] == {"sft_steps": 3}
    assert built.extra["source"]["generator"]["model"] == "tiny"


# --------------------------------------------------------------------------- CLI


def test_set_dotted_builds_nested_config() -> None:
    cfg: dict = {"source": {"kind": "hf"}}
    cli.set_dotted(cfg, "source.kind=generated")
    cli.set_dotted(cfg, "groups.sentiment=2/3")
    cli.set_dotted(cfg, "users=12")
    cli.set_dotted(cfg, "grammar.lint_kinds=[Agreement, Repetition]")
    assert cfg == {"source": {"kind": "generated"}, "groups": {"sentiment": "2/3"}, "users": 12,
                   "grammar": {"lint_kinds": ["Agreement", "Repetition"]}}
    with pytest.raises(EmdpoError, match="expected KEY=VALUE"):
        cli.set_dotted(cfg, "users")
    with pytest.raises(EmdpoError, match="'users' holds 12, not a mapping"):
        cli.set_dotted(cfg, "users.x=1")


def test_cli_build_with_config_file_and_overrides(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "imdb.yaml"
    conf.write_text("source:\n  kind: generated\n  pool_size: 100\nusers: 50\npairs_per_user: 4\ntest_size: 10\nseed: 5\n")
    out = tmp_path / "out"
    rc = cli.main(["data", "build", "imdb_synthetic", "--config", str(conf), "--set", "users=12", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["builder"]["config"]["users"] == 12 and m["builder"]["config"]["seed"] == 5
    assert m["counts"]["comparisons"] == {"train": 48, "test": 20, "val": 20}  # val_size defaults to test_size
    assert validate_path(out).manifest
    assert "48 train, 20 val and 20 test comparisons" in capsys.readouterr().out


def test_cli_unknown_key_is_one_line_error(tmp_path: Path) -> None:
    proc = _run("data", "build", "imdb_synthetic", "--set", "source.kind=generated", "--set", "source.colr=1",
                "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config key 'source.colr': unknown key" in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_bandit_still_builds_and_unknown_builder_errors(tmp_path: Path, capsys) -> None:
    assert cli.main(["data", "build", "bandit", "--set", "annotators=10", "--set", "seed=2", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["builder"]["config"]["seed"] == 2
    assert cli.main(["data", "build", "bandit", "--set", "bogus=1", "--out", str(tmp_path / "c")]) == 2
    assert "config key 'bogus': unknown key" in capsys.readouterr().err
    assert cli.main(["data", "build", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown data builder 'nope'" in capsys.readouterr().err
