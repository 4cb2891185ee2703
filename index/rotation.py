"""The rotation a compressed (IVF-PQ) index encodes its vectors in: FAISS's OPQ.

PQ cuts a vector into equal parts of consecutive dimensions and gives each part 256 codes. An
embedding's variance is spread unevenly over its dimensions (a few directions carry most of it),
so some parts get far more to encode than their codes can hold and the candidates they rank miss
true neighbours. OPQ learns an orthonormal rotation that balances the parts for the PQ that
follows. Inner products are unchanged by it (``<Rq, Rx> = <q, x>``), so only what goes into and
is asked of the PQ index is rotated; the full vectors it re-ranks from are not.
"""

from __future__ import annotations

import faiss
import numpy as np

OPQ_SAMPLE = 30_000  # training vectors (OPQ trains a PQ of 256 codes per part on them each iteration)
OPQ_ITERATIONS = 5  # FAISS defaults to 50; a few keep the build short (its time is in bench/compressed.py)


def train_rotation(sample: np.ndarray, parts: int, seed: int = 0) -> np.ndarray:
    """An orthonormal [dim, dim] float32 matrix R for PQ of ``parts`` parts: encode ``x @ R.T``."""
    dim = sample.shape[1]
    if len(sample) > OPQ_SAMPLE:
        sample = sample[np.random.default_rng(seed).choice(len(sample), OPQ_SAMPLE, replace=False)]
    opq = faiss.OPQMatrix(dim, parts)
    opq.niter = OPQ_ITERATIONS
    opq.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.vector_to_array(opq.A).reshape(dim, dim).astype(np.float32)
