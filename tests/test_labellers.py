"""Labellers (data_builders/labellers/): offline engines for real, LanguageTool and the LLM
judge against their HTTP contracts on a local stdlib server, the factory's errors."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from data_builders.labellers import (
    HarperGrammar,
    LanguageToolGrammar,
    LLMJudge,
    VaderSentiment,
    label_valence,
    make_labeller,
    score_items,
    strip_markup,
    text_length,
)
from emdpo_plugin.errors import EmdpoError


@pytest.fixture(scope="module")
def harper() -> HarperGrammar:
    return HarperGrammar(workers=1)


# --------------------------------------------------------------------------- harper


@pytest.mark.parametrize(
    "bad",
    [
        "They was great in this movie.",  # subject-verb agreement
        "He have a strong screen presence.",  # agreement
        "The the acting was fine.",  # doubled word
        "It is a awful film.",  # wrong article
        "I would of given it four stars.",  # "of" for "have"
        "I have saw many films like this one.",  # wrong participle / tense
        "The ending was alot more fun than I expected.",  # "alot"
        "The script was suppose to be clever.",  # "suppose to"
        "Their going to call it brilliant for years.",  # their / they're
        "The second half was more better than the first.",  # double comparative
    ],
)
def test_harper_flags_the_injected_error_kinds(harper: HarperGrammar, bad: str) -> None:
    assert harper.count_errors([bad])[0] >= 1, [(l.lint_kind, l.problem_text) for l in harper.lints(bad)]


def test_harper_clean_text_scores_zero_and_beats_text_with_errors(harper: HarperGrammar) -> None:
    clean = "The acting was wonderful. They were clearly aware of it."
    bad = "The acting was was wonderful. They was clearly aware of it."
    counts = harper.count_errors([clean, bad])
    assert counts.tolist() == [0, 2]
    scores = harper.score([clean, bad])
    assert scores[0] == 0.0 and scores[1] == pytest.approx(-2 / text_length(bad))
    assert scores[0] > scores[1]


def test_harper_counts_only_errors_inside_the_completion(harper: HarperGrammar) -> None:
    prompt = "They was at the cinema on Sunday."  # an error in the prompt must not count
    assert harper.count_errors([" The film was good."], [prompt]).tolist() == [0]
    assert harper.count_errors([" The the film was good."], [prompt]).tolist() == [1]


def test_harper_ignores_markup_and_spelling(harper: HarperGrammar) -> None:
    # `<br />` is blanked out before linting, and Spelling lints (names) are not grammar errors
    assert harper.count_errors(["I loved this movie.<br /><br />Okafor plays the lead."]).tolist() == [0]
    assert strip_markup("a<br /><br />b") == "a b"
    assert strip_markup("a<br />b", keep_offsets=True) == "a\n     b"


def test_harper_lint_kinds_are_configurable() -> None:
    only_agreement = HarperGrammar(lint_kinds=["Agreement"], workers=1)
    assert only_agreement.count_errors(["The the film was good.", "They was good."]).tolist() == [0, 1]
    assert only_agreement.info()["lint_kinds"] == ["Agreement"]


def test_harper_threads_give_the_same_counts(harper: HarperGrammar) -> None:
    texts = [f"They {'was' if i % 2 else 'were'} late for scene {i}." for i in range(150)]
    two = HarperGrammar(workers=2)
    assert two.count_errors(texts).tolist() == harper.count_errors(texts).tolist() == [i % 2 for i in range(150)]


# --------------------------------------------------------------------------- vader


def test_vader_orders_positive_above_negative() -> None:
    vader = VaderSentiment()
    texts = ["A wonderful, brilliant film. I loved it.", "It was a film about a town.", "An awful, boring mess. I hated it."]
    scores = vader.score(texts)
    assert scores[0] > scores[1] > scores[2]
    assert scores.min() >= -1 and scores.max() <= 1
    assert vader.info()["engine"] == "vader" and vader.version != "unknown"


# --------------------------------------------------------------------------- factory


def test_make_labeller_defaults_and_errors() -> None:
    assert make_labeller("grammar").name == "harper"
    assert make_labeller("sentiment").name == "vader"
    with pytest.raises(EmdpoError, match="unknown grammar engine 'gramarly'"):
        make_labeller("grammar", "gramarly")
    with pytest.raises(EmdpoError, match="unknown labeller kind"):
        make_labeller("humour", "vader")
    with pytest.raises(EmdpoError, match=r"'vader' does not take option\(s\) model"):
        make_labeller("sentiment", "vader", model="x")


def test_languagetool_without_install_or_server_refuses_instead_of_downloading(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LTP_PATH", str(tmp_path / "lt"))
    monkeypatch.delenv("LTP_JAR_DIR_PATH", raising=False)
    with pytest.raises(EmdpoError, match="no local LanguageTool install.*server_url.*harper"):
        make_labeller("grammar", "languagetool")
    assert not (tmp_path / "lt").exists() or not any((tmp_path / "lt").iterdir())


def test_hf_sentiment_missing_model_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(EmdpoError, match="cannot load model.*sentiment.engine=vader"):
        make_labeller("sentiment", "hf", model=str(tmp_path / "no-such-model"))


def test_label_valence() -> None:
    assert label_valence("POSITIVE") == 1 and label_valence("negative") == -1 and label_valence("Neutral") == 0
    assert label_valence("1 star") == -1 and label_valence("5 stars") == 1 and label_valence("3 stars") == 0
    assert label_valence("LABEL_0") is None


# --------------------------------------------------------------------------- score_items


class _CountingLabeller:
    kind, name, version = "sentiment", "fake", "0"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def score(self, texts, contexts=None):
        self.seen += list(texts)
        return np.array([len(t) for t in texts], dtype=float)

    def info(self):
        return {}


def test_score_items_labels_each_distinct_completion_once() -> None:
    lab = _CountingLabeller()
    prompts = ["p1", "p1", "p2"]
    responses = [["a", "bb"], ["bb", "a"], ["a", "ccc"]]
    out = score_items(lab, prompts, responses)
    assert [o.tolist() for o in out] == [[1, 2], [2, 1], [1, 3]]
    assert sorted(lab.seen) == ["a", "a", "bb", "ccc"]  # (p1, a), (p1, bb), (p2, a), (p2, ccc)


# --------------------------------------------------------------------------- LanguageTool over HTTP


class _LTHandler(BaseHTTPRequestHandler):
    """The documented LanguageTool HTTP API: GET /v2/languages, POST /v2/check (form fields
    `text`, `language`) answering JSON `matches` with offset/length/rule. Flags "they was"."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/v2/languages"):
            self._json([{"name": "English (US)", "code": "en", "longCode": "en-US"}])
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        if not self.path.startswith("/v2/check"):
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length", 0))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        type(self).requests.append({"content_type": self.headers.get("Content-Type"), "form": form})
        text = form["text"][0]
        matches = [
            {
                "message": "Agreement", "shortMessage": "", "offset": m.start(), "length": m.end() - m.start(),
                "replacements": [{"value": "they were"}], "sentence": text,
                "context": {"text": text, "offset": m.start(), "length": m.end() - m.start()},
                "rule": {"id": "THEY_WAS", "description": "", "issueType": "grammar",
                         "category": {"id": "GRAMMAR", "name": "Grammar"}},
            }
            for m in re.finditer(r"\b[Tt]hey was\b", text)
        ]
        self._json({"software": {"name": "LanguageTool", "version": "6.9-test"}, "language": {"code": "en-US"},
                    "matches": matches})


@pytest.fixture()
def lt_server():
    _LTHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LTHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_languagetool_adapter_speaks_the_v2_check_contract(lt_server: str, monkeypatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    lt = make_labeller("grammar", "languagetool", server_url=lt_server)
    assert isinstance(lt, LanguageToolGrammar)
    assert "6.9-test" in lt.version
    prompt = "They was at home."
    texts = [" They was late, and they was loud.", " It was fine."]
    counts = lt.count_errors(texts, [prompt, prompt])
    assert counts.tolist() == [2, 0]  # the prompt's own error is outside the completion
    checks = [r for r in _LTHandler.requests if r["form"].get("text", [""])[0].startswith(prompt)]
    assert checks and all(r["form"]["language"] == ["en-US"] for r in checks)
    assert all(r["content_type"].startswith("application/x-www-form-urlencoded") for r in checks)
    scores = lt.score(texts, [prompt, prompt])
    assert scores[0] == pytest.approx(-2 / text_length(texts[0])) and scores[1] == 0
    assert lt.info()["server_url"] == lt_server


def test_languagetool_unreachable_server_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(EmdpoError, match="languagetool' cannot start"):
        make_labeller("grammar", "languagetool", server_url="http://127.0.0.1:9")


# --------------------------------------------------------------------------- LLM judge over HTTP


class _JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that prefers the continuation with more
    positive words; records the Authorization header."""

    auth: list[str | None] = []
    positive = ("great", "wonderful", "brilliant", "good")

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])).decode())
        type(self).auth.append(self.headers.get("Authorization"))
        user = body["messages"][-1]["content"]
        a = user.split("Continuation A:\n", 1)[1].split("\n\nContinuation B:\n", 1)[0]
        b = user.split("Continuation B:\n", 1)[1].split("\n\n", 1)[0]
        pos = lambda t: sum(t.lower().count(w) for w in self.positive)  # noqa: E731
        answer = "A" if pos(a) >= pos(b) else "B"  # position bias on ties, on purpose
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                              "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def judge_server():
    _JudgeHandler.auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_judge_pairwise_and_rankings(judge_server: str, monkeypatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    judge = make_labeller("sentiment", "llm_judge", base_url=judge_server, model="judge-1", api_key_env="MY_JUDGE_KEY")
    assert isinstance(judge, LLMJudge)
    verdicts = judge.compare(["p", "p", "p"], [" great and wonderful", " dull", " plain"], [" dull", " good", " plain"])
    # both orders are asked: a tie answered by position ("A" both times) is no preference
    assert verdicts.tolist() == [1, -1, 0]
    assert set(_JudgeHandler.auth) == {"Bearer sk-test"}
    scores = score_items(judge, ["p"], [[" dull", " great and wonderful", " good"]])[0]
    assert np.argsort(-scores).tolist() == [1, 2, 0]  # Copeland ranking
    assert judge.info()["engine"] == "llm_judge" and judge.version.startswith("judge-1")


def test_llm_judge_needs_endpoint_and_key(monkeypatch) -> None:
    with pytest.raises(EmdpoError, match="needs sentiment.base_url"):
        make_labeller("sentiment", "llm_judge")
    monkeypatch.delenv("NOT_SET_KEY_FOR_TEST", raising=False)
    with pytest.raises(EmdpoError, match="NOT_SET_KEY_FOR_TEST is not set"):
        make_labeller("grammar", "llm_judge", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NOT_SET_KEY_FOR_TEST")


# --------------------------------------------------------------------------- HF text classification


def _tiny_classifier(folder: Path) -> Path:
    """A randomly initialised 2-label classifier with a word-level tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] a the film movie was great awful good bad i it loved hated".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64,
                     id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_hf_sentiment_pipeline_on_a_local_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_classifier(tmp_path / "clf")
    hf = make_labeller("sentiment", "hf", model=str(folder))
    texts = ["i loved the film", "i hated the movie it was awful"]
    scores = hf.score(texts)
    raw = hf._pipe(texts, top_k=None)
    expected = [sum(r["score"] * (1 if r["label"] == "POSITIVE" else -1) for r in res) for res in raw]
    assert scores == pytest.approx(expected)
    assert np.all(np.abs(scores) <= 1)
    assert hf.info()["label_values"] == {"NEGATIVE": -1.0, "POSITIVE": 1.0}
    assert str(folder) in hf.version


def test_hf_sentiment_unknown_labels_need_label_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_classifier(tmp_path / "clf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    cfg["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmdpoError, match="set sentiment.label_values"):
        make_labeller("sentiment", "hf", model=str(folder))
    hf = make_labeller("sentiment", "hf", model=str(folder), label_values={"LABEL_0": -1, "LABEL_1": 1})
    assert hf.score(["good film"]).shape == (1,)
