"""Retrieval evaluation: distances, the sysu / regdb / llcm metrics (FDNM_SPEC.md §4) and k-reciprocal re-ranking."""

from fdnm_jax.evaluation.metrics import PROTOCOLS, compute_metrics, pairwise_distance
from fdnm_jax.evaluation.reranking import re_ranking

__all__ = ["PROTOCOLS", "compute_metrics", "pairwise_distance", "re_ranking"]
