"""k-means with k chosen by silhouette, and a 2-D t-SNE map, for sentence embeddings
(Exp 1 and 2 of Mohammadi 2024: cluster the SBERT embeddings, show them on a t-SNE map)."""

from __future__ import annotations

import numpy as np


def kmeans_by_silhouette(emb, max_k: int, seed: int) -> tuple[np.ndarray, int, float]:
    """(labels [n], k, silhouette) for the k in 2..max_k with the best cosine silhouette;
    one cluster (k = 1, silhouette nan) when there are too few points or no split."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(emb)
    best = (-2.0, 1, np.zeros(n, int))
    for k in range(2, min(max_k, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
        if len(set(labels)) > 1:
            score = float(silhouette_score(emb, labels, metric="cosine"))
            if score > best[0]:
                best = (score, k, labels)
    score, k, labels = best
    return labels, k, score if k > 1 else float("nan")


def tsne_xy(emb, seed: int) -> np.ndarray:
    """[n, 2] t-SNE coordinates (perplexity scaled down for small n)."""
    from sklearn.manifold import TSNE

    n = len(emb)
    return TSNE(
        n_components=2, perplexity=max(2.0, min(30.0, (n - 1) / 3)), random_state=seed, init="pca"
    ).fit_transform(emb)
