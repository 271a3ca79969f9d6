"""Synthetic traces whose correctness depends on entropy; a hand-computable classifier (tests only).

Each response has a latent confidence c ~ Beta(a_s, b_s) that depends on its
slice; it is correct with probability c, and its entropy trajectory is drawn so
that low c means high, spiky entropy. A sentinel can therefore recover c from
the trajectory statistics, and per-slice estimates should track true accuracy.
"""

import numpy as np

# slice -> Beta parameters of the latent confidence (mean a/(a+b))
SLICES = {"easy": (8.0, 2.0), "mid": (4.0, 4.0), "hard": (2.0, 7.0), "mixed": (1.5, 1.5)}


def make_traces(n_per_slice=500, seed=0, slices=SLICES, k=20, with_topk=True):
    rng = np.random.default_rng(seed)
    out = []
    for s, (a, b) in slices.items():
        for i in range(n_per_slice):
            c = rng.beta(a, b)
            T = int(rng.integers(5, 60))
            base = 0.05 + 2.5 * (1 - c)
            full = rng.gamma(1.5, base / 1.5, size=T)
            spikes = rng.random(T) < 0.3 * (1 - c)
            full[spikes] += rng.exponential(2.0, size=spikes.sum())
            rec = {"id": f"{s}/{i}", "slice": s, "correct": bool(rng.random() < c),
                   "entropy": {"full": full.round(6).tolist()}, "k": k,
                   "finish_reason": "stop"}  # the default sentinel's length features read it
            if with_topk:
                rec["entropy"]["topk"] = (full * 0.8).round(6).tolist()
                rec["entropy"]["top5"] = (full * 0.5).round(6).tolist()
            out.append(rec)
    return out


class MeanClassifier:
    """P(correct) = training accuracy for every response: estimates are hand-computable."""

    def fit(self, X, y):
        self.p = float(np.mean(y))
        return self

    def predict_proba(self, X):
        return np.column_stack([np.full(len(X), 1 - self.p), np.full(len(X), self.p)])
