"""`em_dpo` stage: soft EM over latent annotator types (paper Algorithm 1).

Default start, as Algorithm 1: K seeded type policies (really trained, see below), eta_0 = 1/K,
an E-step under those policies, then alternate M-step (a weighted DPO per type plus the
closed-form eta update) and E-step (every comparison scored under every type, posterior per
annotator in log space). The observed log-likelihood is recorded every iteration.

Seeding (`init: seeded`): every type would otherwise start at the reference, EM's symmetric
fixed point. Split seeding: type 0 is fitted to every comparison, each next type to the
annotators the types so far explain worse (`worse_explained`: the upper of two 1-D k-means
clusters of the mean NLL per comparison under the closest type). Each seeding fit is real
training: the backend's from-reference budget (or `seed_epochs` passes) at a constant
learning rate, since a warm-up can leave a short fit at lr 0; the backends refuse any fit
whose every step would run at lr 0. So symmetry is broken by
training, never only by a random adapter initialisation (full fine-tuning has none). Fitting a
type to one annotator's comparisons (k-means++ style, tried first) does not work on language
models: 25 comparisons are memorised, not generalised, and the first E-step was no better than
chance on the CPU recipe's data. `init: dirichlet` draws random soft assignments instead. K = 1
needs no seeding: one type from the reference, i.e. DPO on every comparison.

Feature start (`init: features`, the CPU recipe's): the responsibilities of a K-type mixture of
linear Bradley-Terry rewards on the reference model's pooled last hidden states (`feature_start`,
`algorithms.bt_mixture`; the features come from the reference pass every run makes), then each
type policy fitted to them from the reference (`seed_epochs` at a constant lr: the group-wise
starting policies Algorithm 1 takes as input), and EM proper from its first E-step. It replaces
K seeding fits and their scoring passes with a logistic regression, and the start no longer
depends on where a split falls: on the CPU demo's data EM reached ARI >= 0.96 in two iterations
on seeds 0, 3 and 4, at 1.65x one DPO epoch (the seeded start: 4.3x, 3 iterations).

Departure (opt-in): `inputs: {init: <clustering stage>}` starts from another stage's hard
assignments instead, which makes EM depend on that baseline. When that stage trained one policy
per type (cluster_dpo), those policies are M-step 0: an E-step under them, then warm M-steps
(nothing is retrained from the reference); otherwise the assignments, smoothed by
`init_smoothing`, weight a first M-step from the reference.

Warm start: with `warm_start: true` an M-step continues from the type's previous policy
(`warm_epochs` passes); `false` refits each M-step from the reference for one schedule
(`max_epochs`), so each final policy has the same budget as the `dpo` baseline.

Model selection: `K: [1, 2, 3, 4]` holds out `heldout_fraction` of each annotator's
comparisons, runs EM for each K on the rest, scores the held-out comparisons by each
annotator's posterior predictive log-likelihood `sum_i log sum_k g_ik prod_{j held out}
sigma_k(ij)` (g from the annotator's training comparisons), chooses the K with the highest
score, and refits that K on all comparisons (so the stage costs len(K) + 1 EM runs). Scores
go to the outputs and clustering.json (`model_selection`, `chosen_K`): a user learns whether
the annotators differ at all (K = 1 wins when they do not).

`restarts` runs EM from several seeds and keeps the run with the best final log-likelihood;
restart r > 0 seeds type 0 on a bootstrap resample of the annotators, so restarts differ.
A checkpoint is written after every finished iteration; a killed run resumed with the same
config, seed, data content and reference model (`checkpoint_fingerprint`) continues from the
last finished iteration; any other checkpoint is ignored and EM starts afresh.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from scipy.special import logsumexp
from tqdm.auto import tqdm

from .. import faults, runlog, tracking
from ..algorithms.em import (annotator_loglik, comparison_weights, dirichlet_responsibilities, e_step,
                             sample_by_responsibility, update_eta)
from ..algorithms.likelihood import comparison_loglik
from ..algorithms.metrics import clustering_scores
from ..artifacts import Slot
from ..backends.base import FitSchedule, SupportsTrainingState
from ..data.schema import ComparisonSet
from ..errors import RecipeError
from ..executors import Executor, FitJob, LocalExecutor
from ..fingerprint import digest
from .base import StageConfig, StageContext, Trainer, seed_field
from .common import dataset_from, rel_path, run_path, stage_seed


LOCAL = LocalExecutor()


class EMConfig(StageConfig):
    K: int | list[int] = Field(2, description="number of latent annotator types; a list (e.g. [1, 2, 3, 4]) picks one "
                                              "by held-out log-likelihood")
    iterations: int = Field(10, ge=1, description="maximum EM iterations (paper: 10 for IMDb, up to 100 for the bandit)")
    tol: float = Field(0.0, ge=0, description="stop when the log-likelihood gains no more than tol (relative); 0: only "
                                              "at an exact fixed point (gain 0)")
    resp_tol: float = Field(0.01, ge=0, description=(
        "stop once every annotator keeps its most likely type and responsibilities moved less than resp_tol on "
        "average in an iteration (after min_iterations); 0: off"))
    min_iterations: int = Field(2, ge=1, description="iterations run before resp_tol may stop EM")
    min_responsibility: float = Field(0.1, ge=0, lt=1, description=(
        "M-step skips rows whose annotator's responsibility g_ik for the type is below this (the default sits above "
        "a smoothed clustering start's s/K, so even the first M-step is sparse); 0: none skipped"))
    warm_epochs: float | None = Field(None, gt=0, description=(
        "passes of each warm-started M-step over its rows, fractions allowed (a fraction f trains rows drawn by "
        "responsibility, f times the type's data mass, new rows each iteration); default: model.train.warm_epochs "
        "(or the bandit's warm_epochs)"))
    estep: Literal["incremental", "exact"] = Field("incremental", description=(
        "incremental: a type's log-likelihood of the rows it just trained comes from that training pass, its other "
        "rows are re-scored only for annotators whose responsibility is at least candidate_floor (plus one rotating "
        "type per iteration; stale scores elsewhere), and a full exact E-step ends EM; exact: every row re-scored "
        "under every type after every M-step (Algorithm 1 as written), with the generalised-EM guard"))
    candidate_floor: float = Field(1e-3, ge=0, lt=1, description=(
        "estep: incremental: a type re-scores an annotator's rows it did not train only above this responsibility"))
    init: Literal["features", "seeded", "dirichlet"] = Field("seeded", description=(
        "symmetry breaking: features (responsibilities of a linear reward mixture on the reference's features, "
        "then the type policies fitted to them from the reference, seed_epochs each), seeded (trained seeding "
        "policies, eta_0 = 1/K: Algorithm 1) or dirichlet (random responsibilities); ignored when inputs.init "
        "names a clustering stage"))
    seeding: Literal["split", "annotator"] = Field("split", description=(
        "init: seeded: split (type 0 on everyone, next types on the worse-explained annotators; for LMs) or "
        "annotator (likelihood k-means++ over single annotators; for small tabular policies such as the bandit)"))
    seed_epochs: float | None = Field(None, gt=0, description=(
        "passes of each fit that creates a type policy from the reference (seeding fits; init: features, the first "
        "M-step) (default: the backend's from-reference budget, model.train.max_epochs or the bandit's epochs), "
        "always at a constant learning rate"))
    init_smoothing: float = Field(0.1, ge=0, lt=1, description="inputs.init: hard assignments g become (1-s) g + s/K")
    init_concentration: float = Field(1.0, gt=0, description="Dirichlet concentration (init: dirichlet)")
    warm_start: bool = Field(True, description="M-steps continue from the previous policies (warm_epochs); false: each M-step refits from the reference for max_epochs (the dpo baseline's budget per final policy)")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="K list: share of each annotator's comparisons held out to score each K")
    restarts: int = Field(1, ge=1, description="EM runs from different seeds; the best log-likelihood wins")
    seed: int | None = seed_field("seeding, Dirichlet draws and restarts")

    @field_validator("K")
    @classmethod
    def _check_k(cls, v: int | list[int]) -> int | list[int]:
        ks = [v] if isinstance(v, int) else v
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError("K must be a positive int or a non-empty list of distinct positive ints")
        return v

    @property
    def candidates(self) -> list[int]:
        return [self.K] if isinstance(self.K, int) else list(self.K)


def worse_explained(nll: np.ndarray, seed: int) -> np.ndarray:
    """The annotators in the upper of two clusters of their mean NLL (1-D k-means, scikit-learn).

    A threshold at the mean NLL, used before, takes in annotators of the majority when the
    groups differ in size (the mean sits nearer the majority's mode): on the CPU demo's data
    (groups 2:1, the minority 67 of 200) it chose 93-111, and EM failed on one of three seeds
    (ARI 0.12). Two clusters cut between the modes whatever the group sizes; with the recipe's
    half-epoch seeding fits EM then recovered all three seeds (ARI >= 0.98). The NLL is not
    cleanly bimodal there (this cut chose 50-122 across seeds and budgets), so the start is
    still the fragile part of EM. Empty when every annotator is explained equally well."""
    from sklearn.cluster import KMeans

    x = np.asarray(nll, dtype=np.float64).reshape(-1, 1)
    if np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max())):
        return np.zeros(len(x), dtype=bool)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x)
    return km.labels_ == int(np.argmax(km.cluster_centers_[:, 0]))


def seed_policies(backend: Any, data: ComparisonSet, ref: np.ndarray, K: int, seed: int,
                  executor: Executor = LOCAL, epochs: float | None = None, bootstrap: bool = False,
                  mode: str = "split") -> tuple[list[Any], np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Split seeding: K really trained type policies that differ where the annotators do.

    Type 0 is fitted to every comparison (`bootstrap`: to a bootstrap resample of the annotators,
    weight = times drawn, so EM restarts start apart); type k to the annotators whose comparisons the types
    so far explain worse (the upper cluster of the mean NLL per comparison under the closest
    type, `worse_explained`; a random half if all are explained equally well). One annotator's
    comparisons are too few to carry a taste that generalises: fitted to them, a language
    model memorises (measured on the CPU recipe: first E-step ARI about 0 whatever the budget).
    Each fit: `epochs` passes (None: the backend's from-reference budget) at a constant learning
    rate, so no warm-up can leave it at lr 0. Returns (policies, comparison
    log-likelihoods (n, K) under them, passes (n, K) each row received, each fit's stats).

    `mode: annotator` is k-means++ in likelihood space instead: type 0 fitted to one random
    annotator, each next type to an annotator drawn with probability proportional to its squared
    mean NLL under the closest type so far. It suits small policies whose types one annotator's
    comparisons pin down (the bandit: measured to recover all three groups there, where the split
    start merges the smallest group); it does not suit language models (see above).
    Each seed policy is scored afresh on every comparison, whatever `estep`: the split criterion
    and the first E-step need the finished policy's scores (measured on the CPU demo: with
    training-pass scores instead the first E-step's mean max responsibility fell from 0.95 to
    0.81 and EM needed two more iterations to reach ARI 1)."""
    rng = np.random.default_rng(seed)
    idx, n = data.annotator_index, data.n_annotators
    per_annotator = np.maximum(np.bincount(idx, minlength=n), 1)
    schedule = FitSchedule(epochs=epochs, constant_lr=True)
    policies, cols, fits = [], [], []
    passes = np.zeros((len(data), K))
    for k in range(K):
        if mode == "annotator":
            if k == 0:
                pick = int(rng.integers(n))
            else:
                nll = -annotator_loglik(np.stack(cols, axis=1), idx, n).max(axis=1) / per_annotator
                d2 = np.clip(nll, 0, None) ** 2
                d2[[f["annotator"] for f in fits]] = 0.0
                pick = int(rng.choice(n, p=d2 / d2.sum())) if d2.sum() > 0 else int(rng.integers(n))
            chosen = np.arange(n) == pick
            mask = chosen[idx].astype(np.float64)
        elif k == 0:
            drawn = np.bincount(rng.integers(n, size=n), minlength=n) if bootstrap else np.ones(n)
            chosen, mask = drawn > 0, drawn[idx].astype(np.float64)
        else:
            nll = -annotator_loglik(np.stack(cols, axis=1), idx, n).max(axis=1) / per_annotator
            chosen = worse_explained(nll, seed + k)
            if not chosen.any():  # no annotator stands out: nothing to follow but chance
                chosen = rng.random(n) < 0.5
            mask = chosen[idx].astype(np.float64)
        policy = backend.new_policy(seed + 1000 * k)
        fit = executor.fit_many(backend, data, [FitJob(policy, mask, False, f"seed type{k}", schedule)])[0]
        passes[:, k] = fit.get("epochs", 0.0) * (mask > 0)
        col, scored = type_loglik(backend, policy, data, ref, executor, fit)
        scored = int(scored.sum())
        fits.append({**fit, "annotators": int(chosen.sum()), "pairs_scored": scored,
                     **({"annotator": int(np.flatnonzero(chosen)[0])} if mode == "annotator" else {})})
        policies.append(policy)
        cols.append(col)
    return policies, np.stack(cols, axis=1), passes, fits


def feature_start(backend: Any, data: ComparisonSet, K: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Responsibilities (annotators, K) of a K-type mixture of linear Bradley-Terry rewards on the
    reference's response features (`algorithms.bt_mixture`), and what it found.

    Why: a policy a few DPO steps from the reference moves its log-probs roughly linearly in
    these features, so the mixture sees the annotator types EM-DPO is after, for the cost of a
    logistic regression instead of trained seeding fits (the features come from the reference's
    forward pass, which every run makes anyway). Measured on the CPU demo's data (tiny LM, 64-d
    features): ARI 0.90 with the true groups from every one of 8 Dirichlet starts, so one start
    with a loose tolerance (1e-4 relative; 0.6 s for K=2, 2.7 s for K=4 there) is enough; EM's
    own `restarts` vary its seed."""
    from ..algorithms.bt_mixture import fit_linear_bt_mixture
    from ..backends.base import SupportsFeatures

    if not isinstance(backend, SupportsFeatures):
        raise RecipeError(f"em_dpo init: features needs a backend with reference features (the openrlhf "
                          f"backend); {type(backend).__name__} has none: use init: seeded")
    t = time.perf_counter()
    feats = backend.ref_features(data)
    mix = fit_linear_bt_mixture(feats, data.rankings, data.response_mask, data.annotator_index,
                                data.n_annotators, K, seed=seed, restarts=1, tol=1e-4)
    return mix.responsibilities, {"log_likelihood": mix.log_likelihood, "eta": mix.eta.tolist(),
                                  "iterations": len(mix.trace), "dim": int(feats.shape[-1]),
                                  "mean_max_responsibility": float(mix.responsibilities.max(1).mean()),
                                  "seconds": round(time.perf_counter() - t, 3)}


def epochs_seen(passes: np.ndarray, log_resp: np.ndarray, annotator_index: np.ndarray) -> list[float]:
    """Training passes each type policy received, one number per type.

    `passes[j, k]` counts the passes over comparison j by the fits the type-k policy descends
    from: seeding and every M-step it kept; a fit from the reference (`warm_start: false`)
    resets the count, and a fit the generalised-EM guard rejected adds nothing. The type's
    number is the mean of passes[:, k] over comparisons weighted by the final responsibility of
    their annotator for type k: how often, on average, the type's own data was trained on. For
    plain DPO this is its epochs; warm-started EM gives about iterations x warm_epochs."""
    g = np.exp(np.asarray(log_resp))[annotator_index]
    out = []
    for k in range(passes.shape[1]):
        w = g[:, k]
        out.append(float(passes[:, k] @ w / w.sum()) if w.sum() > 0 else float(passes[:, k].mean()))
    return out


class _Checkpoint:
    """One restart's state after its last finished iteration, replaced atomically.

    A save writes `<root>.tmp`, moves the last checkpoint aside to `<root>.old`, renames the new
    one into place, then deletes `<root>.old`. A kill can stop it between any two steps, so
    `recover` (run before every load and save) finishes the job: `.old` alone is the last
    complete checkpoint and goes back into place, `.old` beside the root is garbage, and `.tmp`
    is never known to be complete."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.fingerprint = root, fingerprint
        self.tmp = root.with_name(root.name + ".tmp")
        self.old = root.with_name(root.name + ".old")

    def recover(self) -> None:
        if self.old.exists():
            if self.root.exists():
                shutil.rmtree(self.old)
            else:
                self.old.rename(self.root)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def load(self, backend: Any) -> tuple[dict[str, Any], list[Any], np.ndarray, np.ndarray] | None:
        self.recover()
        state_file = self.root / "state.json"
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != self.fingerprint:
            return None
        policies = [backend.load(self.root / f"type{k}") for k in range(len(state["eta"]))]
        ll = np.load(self.root / "comparison_ll.npy")
        passes_file = self.root / "passes.npy"
        passes = np.load(passes_file) if passes_file.exists() else np.zeros_like(ll)
        return state, policies, ll, passes

    def save(self, backend: Any, state: dict[str, Any], policies: list[Any], comparison_ll: np.ndarray,
             passes: np.ndarray) -> None:
        self.recover()
        self.tmp.mkdir(parents=True)
        for k, p in enumerate(policies):
            backend.save(p, self.tmp / f"type{k}")
            if isinstance(backend, SupportsTrainingState):  # a resumed run continues each type's optimiser
                backend.save_training_state(p, self.tmp / f"type{k}")
        np.save(self.tmp / "comparison_ll.npy", comparison_ll)
        np.save(self.tmp / "passes.npy", passes)
        (self.tmp / "state.json").write_text(json.dumps({**state, "fingerprint": self.fingerprint}))
        faults.point("em.checkpoint.written")
        if self.root.exists():
            self.root.rename(self.old)
        faults.point("em.checkpoint.swapping")
        self.tmp.rename(self.root)
        faults.point("em.checkpoint.swapped")
        shutil.rmtree(self.old, ignore_errors=True)


def type_loglik(backend: Any, policy: Any, data: ComparisonSet, ref: np.ndarray, executor: Executor,
                fit: dict[str, Any] | None = None, prev: np.ndarray | None = None,
                rescore: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One type's log-likelihood of every comparison, (n,), and which comparisons were scored
    under `policy` just now (a boolean mask).

    Rows the fit trained take their value from its training pass (`row_ll`, popped from the
    fit's stats; computed just before the row's own update, so slightly stale), rows in
    `rescore` (default: all) are scored under the policy, and the rest keep `prev`. A row with
    no value at all is always scored."""
    col = np.full(len(data), np.nan) if prev is None else np.array(prev, dtype=np.float64)
    need = np.ones(len(data), dtype=bool) if rescore is None else np.array(rescore, dtype=bool)
    row_ll = fit.pop("row_ll", None) if fit is not None else None
    if row_ll is not None:
        got = np.isfinite(row_ll)
        col[got], need[got] = row_ll[got], False
    need |= np.isnan(col)
    if need.any():
        col[need] = executor.loglik_many(backend, [policy], data.subset(need), ref[need])[:, 0]
    return col, need


def m_step(backend: Any, policies: list[Any], data: ComparisonSet, weights: np.ndarray, ref: np.ndarray,
           prev_ll: np.ndarray | None, warm: bool, desc: str, executor: Executor = LOCAL,
           schedules: list[FitSchedule | None] | None = None,
           rescore: np.ndarray | None = None, guard: bool = True
           ) -> tuple[list[Any], np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Weighted DPO per type, then each type's log-likelihood of every comparison; returns
    (policies, log-likelihoods (n, K), which of them were scored under the final policies (n, K),
    fit stats).

    `rescore` None: every comparison is scored under every new policy. `guard` (with exact
    `prev_ll`, i.e. `estep: exact`): the generalised-EM guard: a type whose new policy lowers its
    weighted objective `sum_j w_jk ll_k(j)` keeps its previous policy, so the observed
    log-likelihood can only grow (an M-step solved by a few epochs of SGD is not guaranteed to
    improve it). `rescore` (n, K) (incremental E-step): trained rows from the training pass,
    rows marked there scored, the rest kept from `prev_ll` (see `type_loglik`); without exact
    scores of the previous policies the guard has nothing to compare, so incremental runs turn it
    off and end with an exact E-step instead.
    """
    schedules = schedules or [None] * len(policies)
    exact = rescore is None
    previous = [copy.deepcopy(p) for p in policies] if guard and exact and prev_ll is not None else None
    fits = executor.fit_many(backend, data, [FitJob(p, weights[:, k], warm, f"{desc} type{k}", schedules[k])
                                             for k, p in enumerate(policies)])
    faults.point("em.m_step")
    if exact:
        for f in fits:
            f.pop("row_ll", None)
        ll = executor.loglik_many(backend, policies, data, ref)
        fresh = np.ones(ll.shape, dtype=bool)
        for f in fits:
            f["pairs_scored"] = len(data)
    else:
        cols, masks = [], []
        for k, p in enumerate(policies):
            col, scored = type_loglik(backend, p, data, ref, executor, fits[k],
                                      None if prev_ll is None else prev_ll[:, k], rescore[:, k])
            fits[k]["pairs_scored"] = int(scored.sum())
            cols.append(col)
            masks.append(scored)
        ll, fresh = np.stack(cols, axis=1), np.stack(masks, axis=1)
    if previous is not None:
        for k in range(len(policies)):
            if weights[:, k] @ ll[:, k] < weights[:, k] @ prev_ll[:, k]:
                policies[k], ll[:, k] = previous[k], prev_ll[:, k]
                fits[k] = {**fits[k], "kept_previous": True}
    return policies, ll, fresh, fits


def run_em(backend: Any, data: ComparisonSet, cfg: EMConfig, seed: int, ckpt: _Checkpoint, desc: str,
           init_resp: np.ndarray | None = None, executor: Executor = LOCAL,
           restart: int = 0, track: str | None = None,
           init_policies: tuple[list[Any], list[float]] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """One EM run from one seed with `cfg.K` types (an int); returns (state, policies).

    Resumes from `ckpt` if present. `init_resp` (annotators x K), e.g. another stage's
    clustering, replaces the seeded start; with `init_policies` (that stage's type policies and
    the passes each received) those policies are M-step 0: EM starts with an E-step under them
    and warm M-steps, rather than retraining the types from the reference. `state["epochs_seen"]` holds each type's training
    passes (see `epochs_seen`). `track` names the tracker namespace of its per-iteration series."""
    K = cfg.K
    assert isinstance(K, int), "run_em takes one K; the stage selects among several"
    ref = backend.ref_score(data)  # once per dataset, never inside the loop
    incremental = cfg.estep == "incremental"
    loaded = ckpt.load(backend)
    cost = _Cost(backend, loaded[0].get("cost") if loaded is not None else None)
    seeded = init_resp is None and cfg.init == "seeded" and K > 1
    from_policies = init_resp is not None and init_policies is not None
    if loaded is not None:
        state, policies, ll, passes = loaded
        if state["done"]:
            return state, policies
        state.setdefault("resumed_from_iteration", []).append(state["iteration"])
        log_resp = np.array(state["log_resp"])
    else:
        ll = None
        passes = np.zeros((len(data), K))
        state = {"iteration": 0, "log_likelihood": [], "eta_trace": [], "fit": [], "done": False}
        if from_policies:  # the clustering stage's policies are M-step 0: an E-step under them
            policies, seen = init_policies
            ll = executor.loglik_many(backend, policies, data, ref)
            est = e_step(ll, data.annotator_index, data.n_annotators, update_eta(np.log(init_resp + 1e-300)))
            log_resp = est.log_resp
            passes = np.asarray(seen)[None, :] * (init_resp[data.annotator_index] > 0.5)
            state["start"] = "clustering policies"
        elif init_resp is not None:
            policies = [backend.new_policy(seed + 1000 * k) for k in range(K)]
            log_resp = np.log((1 - cfg.init_smoothing) * init_resp + cfg.init_smoothing / K)
            state["start"] = "clustering"
        elif K == 1:  # nothing to break: one type from the reference, every comparison weight 1
            policies = [backend.new_policy(seed)]
            log_resp = np.zeros((data.n_annotators, 1))
            state["start"] = "single type"
        elif cfg.init == "seeded":  # Algorithm 1: eta_0 = 1/K, E-step under the seeded policies
            policies, ll, passes, seed_fits = seed_policies(backend, data, ref, K, seed, executor, cfg.seed_epochs,
                                                            bootstrap=restart > 0, mode=cfg.seeding)
            est = e_step(ll, data.annotator_index, data.n_annotators, np.full(K, 1.0 / K))
            log_resp = est.log_resp
            state["start"] = "seeded"
            state["seeding"] = {"epochs": cfg.seed_epochs, "fits": seed_fits,
                                "mean_max_responsibility": float(np.exp(log_resp).max(1).mean())}
        elif cfg.init == "features":  # type policies fitted from the reference to these responsibilities
            policies = [backend.new_policy(seed + 1000 * k) for k in range(K)]
            resp, state["feature_start"] = feature_start(backend, data, K, seed)
            log_resp = np.log(np.clip(resp, 1e-300, None))
            state["start"] = "features"
            if incremental:  # each type's last known score is the reference's (where every policy
                # starts): the first E-step keeps it where the annotator is no candidate for the type
                at_ref = comparison_loglik(ref, ref, data.rankings, data.response_mask, backend.beta,
                                           backend.label_smoothing)
                ll = np.repeat(at_ref[:, None], K, axis=1)
        else:
            policies = [backend.new_policy(seed + 1000 * k) for k in range(K)]
            log_resp = np.log(dirichlet_responsibilities(data.n_annotators, K, seed, cfg.init_concentration))
            state["start"] = "dirichlet"
    bar = tqdm(total=cfg.iterations, initial=state["iteration"], desc=desc, leave=False)
    groups = data.annotator_groups()
    groups = groups if groups and all(g is not None for g in groups) else None
    if groups is not None and "feature_start" in state and state["iteration"] == 0:
        state["feature_start"]["ari"] = clustering_scores(groups, log_resp.argmax(1))["ari"]
    if state["iteration"] == 0 and "seeding" in state:
        cost.add_fits(state["seeding"]["fits"])
    started, first_iteration = time.perf_counter(), state["iteration"]
    while state["iteration"] < cfg.iterations:
        it = state["iteration"]
        eta = update_eta(log_resp)
        resp = np.exp(log_resp)
        weights = comparison_weights(resp, data.annotator_index, cfg.min_responsibility)
        warm = cfg.warm_start and (it > 0 or seeded or from_policies)
        # the first M-step of a feature start creates the type policies, as seeding fits would
        creates = cfg.warm_start and it == 0 and state.get("start") == "features"
        epochs = cfg.warm_epochs if warm else cfg.seed_epochs if creates else None
        # each iteration and type its own draws and row order: a fraction of an epoch sees new rows,
        # and a resumed run the same rows as an uninterrupted one
        order_seeds = [seed + 1000 * k + 7919 * (it + 1) for k in range(K)]
        if epochs is not None and epochs < 1:  # a fraction of an epoch: rows drawn by responsibility
            weights = np.stack([sample_by_responsibility(weights[:, k], epochs, np.random.default_rng(order_seeds[k]))
                                for k in range(K)], axis=1)
            epochs = 1.0
        # training-pass log-likelihoods stand in for the final policy's only after a warm fit: a fit
        # from the reference scored its early rows near the reference (measured on the CPU demo with
        # a feature start: ARI 0.88 -> 0.82 after M-step 0 with them), so its rows are scored afresh
        schedules = [FitSchedule(epochs=epochs, constant_lr=creates, order_seed=order_seeds[k],
                                 return_row_ll=incremental and warm) for k in range(K)]
        rescore = None
        if incremental and it + 1 < cfg.iterations:  # the last allowed iteration scores everything at once
            rescore = resp[data.annotator_index] >= cfg.candidate_floor  # candidate types per annotator,
            rescore[:, it % K] = True  # plus one rotating type re-scored everywhere
        policies, ll, fresh, fits = m_step(backend, policies, data, weights, ref, ll, warm, desc, executor,
                                           schedules, rescore, guard=not incremental)
        cost.add_fits(fits)
        for k, f in enumerate(fits):
            if f.get("kept_previous"):
                continue
            trained = (weights[:, k] > 0) * float(f.get("epochs", 0.0))
            passes[:, k] = passes[:, k] + trained if warm else trained
        est = e_step(ll, data.annotator_index, data.n_annotators, eta)
        new_resp = est.responsibilities
        change = np.abs(new_resp - resp)
        moved, switched = float(change.mean()), int((new_resp.argmax(1) != resp.argmax(1)).sum())
        state.setdefault("responsibility_change", []).append({"mean": moved, "max": float(change.max()),
                                                              "switched": switched})
        stable = cfg.resp_tol > 0 and it + 1 >= cfg.min_iterations and switched == 0 and moved < cfg.resp_tol
        trace = state["log_likelihood"]
        gain = est.log_likelihood - trace[-1] if trace else float("inf")
        converged = stable or abs(gain) <= cfg.tol * abs(est.log_likelihood)
        state["iteration"] += 1
        done = converged or state["iteration"] >= cfg.iterations
        if done and rescore is not None:
            # exact from here: every comparison's log-likelihood under the final policies, so the
            # reported responsibilities and likelihood are exact; rows just scored under them are
            # kept, the rest (training-pass values, stale types) scored now
            cols = [type_loglik(backend, p, data, ref, executor, prev=ll[:, k], rescore=~fresh[:, k])[0]
                    for k, p in enumerate(policies)]
            cost.scored += int((~fresh).sum())
            ll = np.stack(cols, axis=1)
            est = e_step(ll, data.annotator_index, data.n_annotators, eta)
        state["final_estep"] = "exact" if done else None
        log_resp = est.log_resp
        trace.append(est.log_likelihood)
        state["eta_trace"].append(eta.tolist())
        state["fit"].append(fits)
        state["stopped"] = ("responsibilities stable" if stable else "log-likelihood converged" if converged
                            else "iterations")
        state.update(eta=eta.tolist(), log_resp=log_resp.tolist(),
                     epochs_seen=epochs_seen(passes, log_resp, data.annotator_index))
        if groups is not None:
            state.setdefault("ari_trace", []).append(clustering_scores(groups, log_resp.argmax(1))["ari"])
        state["done"] = done
        state["cost"] = cost.total()
        t = time.perf_counter()
        ckpt.save(backend, state, policies, ll, passes)
        cost.checkpoint += time.perf_counter() - t
        state["cost"] = cost.total()
        bar.update(1)
        bar.set_postfix(loglik=f"{est.log_likelihood:.3f}", eta=np.round(eta, 3).tolist())
        _report_iteration(desc, track, state, cfg.iterations, weights, log_resp, groups,
                          (time.perf_counter() - started) / (state["iteration"] - first_iteration))
        if done:
            break
    bar.close()
    return state, policies


class _Cost:
    """Where one EM run's time and work went: comparisons trained (rows x passes) and scored,
    and seconds in training, scoring and DeepSpeed engines (the backend's optional `stats`
    counters) and checkpoints, added to what a resumed run had recorded (`before`)."""

    KEYS = {"train": "train_seconds", "score": "score_seconds", "engine": "engine_seconds"}

    def __init__(self, backend: Any, before: dict[str, Any] | None = None) -> None:
        self.stats = getattr(backend, "stats", None) or {}
        self.start = {k: float(self.stats.get(v, 0.0)) for k, v in self.KEYS.items()}
        self.before = before or {"rows_trained": 0, "pairs_scored": 0, "seconds": {}}
        self.rows, self.scored, self.checkpoint = 0, 0, 0.0

    def add_fits(self, fits: list[dict[str, Any]]) -> None:
        for f in fits:
            if not f.get("kept_previous"):
                self.rows += round(f.get("rows", 0) * float(f.get("epochs", 0.0)))
            self.scored += int(f.get("pairs_scored", 0))

    def total(self) -> dict[str, Any]:
        secs = {k: float(self.stats.get(v, 0.0)) - self.start[k] for k, v in self.KEYS.items()}
        secs["checkpoint"] = self.checkpoint
        b = self.before
        return {"rows_trained": b["rows_trained"] + self.rows, "pairs_scored": b["pairs_scored"] + self.scored,
                "seconds": {k: round(b["seconds"].get(k, 0.0) + v, 3) for k, v in secs.items()}}


def _sum_costs(costs: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One stage's cost: its EM runs' (restarts) added up."""
    costs = [c for c in costs if c]
    secs: dict[str, float] = {}
    for c in costs:
        for k, v in c["seconds"].items():
            secs[k] = round(secs.get(k, 0.0) + v, 3)
    return {"rows_trained": sum(c["rows_trained"] for c in costs), "pairs_scored": sum(c["pairs_scored"] for c in costs),
            "seconds": secs}


def _report_iteration(desc: str, track: str | None, state: dict[str, Any], iterations: int, weights: np.ndarray,
                      log_resp: np.ndarray, groups: list[str] | None, seconds_per_iteration: float) -> None:
    """One summary line per EM iteration (terminal and run.log) and its series for the tracker."""
    it, ll, eta = state["iteration"], state["log_likelihood"][-1], state["eta"]
    rows = (weights > 0).sum(axis=0).tolist()
    resp = np.exp(log_resp)
    values: dict[str, float | None] = {"log_likelihood": ll, "iteration_seconds": seconds_per_iteration,
                                       "responsibility_entropy": float(-(resp * log_resp).sum(1).mean()),
                                       **{f"eta_{k}": e for k, e in enumerate(eta)},
                                       **{f"rows_trained_{k}": r for k, r in enumerate(rows)}}
    if groups is not None:
        values.update(clustering_scores(groups, resp.argmax(1)))
    remaining = 0 if state["done"] else iterations - it
    runlog.info(f"{desc} iteration {it}/{iterations}: log-likelihood {ll:.3f}, eta {np.round(eta, 3).tolist()}, "
                f"rows trained {rows}, {runlog.duration(seconds_per_iteration)}/iteration, "
                f"ETA {runlog.duration(remaining * seconds_per_iteration)}")
    tracker = tracking.active()
    if tracker is not None:
        tracker.scalars(track or tracker.stage, values, it)


def heldout_split(data: ComparisonSet, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: round(fraction x m_i) of each annotator's m_i comparisons,
    at least one where m_i >= 2 and never all of them (every annotator keeps training rows)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(data), dtype=bool)
    for a in range(data.n_annotators):
        rows = np.flatnonzero(data.annotator_index == a)
        if len(rows) < 2:
            continue
        n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held[rng.choice(rows, size=n, replace=False)] = True
    return held


def heldout_loglik(backend: Any, policies: list[Any], log_resp: np.ndarray, held: ComparisonSet,
                   executor: Executor = LOCAL) -> float:
    """Posterior predictive log-likelihood of held-out comparisons:
    `sum_i log sum_k g_ik prod_{j held out} sigma_k(ij)`, g from the annotator's training rows."""
    ll = executor.loglik_many(backend, policies, held, backend.ref_score(held))
    per_annotator = annotator_loglik(ll, held.annotator_index, held.n_annotators)
    has = np.bincount(held.annotator_index, minlength=held.n_annotators) > 0
    return float(logsumexp(np.asarray(log_resp) + per_annotator, axis=1)[has].sum())


def clustering_from(ctx: StageContext, outputs: dict[str, Any], annotator_ids: list[str], K: int) -> np.ndarray:
    """Responsibilities recorded by a clustering stage, aligned to this dataset's annotators."""
    if not outputs.get("clustering"):
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: that stage produced no clustering")
    cl = json.loads(run_path(ctx, outputs["clustering"]).read_text())
    resp = np.asarray(cl["responsibilities"], dtype=np.float64)
    if resp.shape[1] != K:
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: that clustering has {resp.shape[1]} types, config.K is {K}")
    pos = {a: i for i, a in enumerate(cl["annotator_ids"])}
    missing = [a for a in annotator_ids if a not in pos]
    if missing:
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: annotators {missing[:3]} are not in that clustering")
    return resp[[pos[a] for a in annotator_ids]]


def policies_of(ctx: StageContext, outputs: dict[str, Any], K: int) -> tuple[list[Any], list[float]] | None:
    """The type policies `<stage>/type0..K-1` a clustering stage trained (cluster_dpo), loaded,
    with the passes each received; None if it recorded no such policies."""
    names = {name.rsplit("/", 1)[-1]: path for name, path in (outputs.get("policies") or {}).items()}
    if sorted(names) != [f"type{k}" for k in range(K)]:
        return None
    seen = {name.rsplit("/", 1)[-1]: v for name, v in (outputs.get("epochs_seen") or {}).items()}
    return ([ctx.backend.load(run_path(ctx, names[f"type{k}"])) for k in range(K)],
            [float(seen.get(f"type{k}", 0.0)) for k in range(K)])


def checkpoint_fingerprint(ctx: StageContext, config: EMConfig, seed: int, data_hash: str,
                           init: dict[str, Any] | None) -> str:
    """What a checkpoint must match to be resumed: the config, the seed, the model section, the
    data's content hash, the reference model's identity (a backend's `reference_identity`, e.g. the
    SFT stage's fingerprint) and the stage's own key. A checkpoint of another seed, other data or
    another reference is never taken for this run's (the run folder's paths are the same)."""
    return digest({"config": config.model_dump(mode="json"), "seed": seed, "model": ctx.recipe.get("model") or {},
                   "data": data_hash, "reference": getattr(ctx.backend, "reference_identity", None),
                   "init": init, "stage": ctx.key}, length=64)


class EMDPOStage(Trainer):
    name = "em_dpo"
    description = "EM-DPO: soft EM over K latent annotator types, each M-step a weighted DPO."
    Config = EMConfig
    input_slots = {"dataset": Slot(("dataset",), "the comparisons to fit"),
                   "init": Slot(("clustering",), "optional departure from Algorithm 1: a clustering stage "
                                                 "(cluster_dpo) whose assignments start EM")}
    produces = ("policies", "clustering")
    required_inputs = ("dataset",)
    resume_state = ("restarts", "select")  # per-restart checkpoints (see _Checkpoint), kept across a kill

    def _best_of_restarts(self, ctx: StageContext, data: ComparisonSet, config: EMConfig, root: Path,
                          fingerprint: str, base_seed: int, init_resp: np.ndarray | None, label: str,
                          init_policies: tuple[list[Any], list[float]] | None = None):
        runs = []
        for r in range(config.restarts):
            ckpt = _Checkpoint(root / f"r{r}", fingerprint)
            track = "/".join([ctx.stage_name, *label.split(), *([f"restart{r}"] if config.restarts > 1 else [])])
            state, policies = run_em(ctx.backend, data, config, base_seed + r, ckpt,
                                     f"{ctx.stage_name}{label} restart {r}", init_resp, ctx.executor, restart=r,
                                     track=track,
                                     init_policies=None if init_policies is None else
                                     ([copy.deepcopy(p) for p in init_policies[0]], init_policies[1]))
            runs.append((state["log_likelihood"][-1], r, state, policies))
        return max(runs, key=lambda t: t[0]), runs

    def run(self, ctx: StageContext, config: EMConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        dataset = dataset_from(ctx, inputs["dataset"])
        data = dataset.train
        candidates = config.candidates
        base_seed = stage_seed(ctx, config)
        fingerprint = checkpoint_fingerprint(ctx, config, base_seed, dataset.content_hash, inputs.get("init"))
        init_resp, init_policies = None, None
        if "init" in inputs:
            if len(candidates) > 1:
                raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: a clustering start needs one K, config.K is {config.K}")
            init_resp = clustering_from(ctx, inputs["init"], data.annotator_ids, candidates[0])
            init_policies = policies_of(ctx, inputs["init"], candidates[0])
        selection: dict[str, Any] | None = None
        if len(candidates) > 1:
            held = heldout_split(data, config.heldout_fraction, base_seed)
            train, test = data.subset(~held), data.subset(held)
            scores = {}
            for K in candidates:
                (_, _, state, policies), _ = self._best_of_restarts(
                    ctx, train, config.model_copy(update={"K": K}), ctx.out_dir / "select" / f"K{K}",
                    fingerprint, base_seed, None, f" K={K}")
                scores[str(K)] = heldout_loglik(ctx.backend, policies, np.array(state["log_resp"]), test, ctx.executor)
            chosen_K = int(max(scores, key=lambda k: scores[k]))
            selection = {"criterion": "heldout_loglik", "heldout_fraction": config.heldout_fraction,
                         "heldout_comparisons": int(held.sum()), "model_selection": scores, "chosen_K": chosen_K}
        K = selection["chosen_K"] if selection else candidates[0]
        (best_ll, best_r, state, policies), runs = self._best_of_restarts(
            ctx, data, config.model_copy(update={"K": K}), ctx.out_dir / "restarts", fingerprint, base_seed,
            init_resp, "", init_policies)
        out = ctx.out_dir
        # each adapter is saved once: the outputs name the chosen restart's last checkpoint folders
        # (that checkpoint holds exactly these policies; a finished checkpoint is never rewritten)
        final = out / "restarts" / f"r{best_r}"
        names = {f"{ctx.stage_name}/type{k}": rel_path(ctx, final / f"type{k}") for k in range(len(policies))}
        seen = dict(zip(names, state.get("epochs_seen", [0.0] * K)))
        clustering = {
            "annotator_ids": data.annotator_ids,
            "responsibilities": np.exp(np.array(state["log_resp"])).tolist(),
            "eta": state["eta"],
            "log_likelihood": state["log_likelihood"],
            "eta_trace": state["eta_trace"],
            "start": state.get("start"),
            "seeding": state.get("seeding"),
            "feature_start": state.get("feature_start"),
            "restarts": [{"restart": r, "final_log_likelihood": ll} for ll, r, _, _ in runs],
            "chosen_restart": best_r,
            "resumed_from_iteration": state.get("resumed_from_iteration", []),
            **(selection or {}),
        }
        (out / "clustering.json").write_text(json.dumps(clustering))
        return {"policies": names, "clustering": rel_path(ctx, out / "clustering.json"),
                "rows_trained_per_iteration": [[f.get("rows") for f in it] for it in state["fit"]],
                "epochs_seen": seen, "start": state.get("start"),
                "backend_stats": dict(getattr(ctx.backend, "stats", None) or {}),  # optional for plugin backends
                "iterations": state["iteration"], "stopped": state.get("stopped"),
                "log_likelihood": best_ll, "eta": state["eta"],
                **({"ari": state["ari_trace"][-1], "ari_trace": state["ari_trace"]} if state.get("ari_trace") else {}),
                "cost": _sum_costs([r[2].get("cost") for r in runs]),
                **({"model_selection": selection["model_selection"], "chosen_K": K} if selection else {})}
