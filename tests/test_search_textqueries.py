"""Query-text encoding under concurrency, with the real (parity-size) model: concurrent texts are
encoded together, each text once, results equal encoding alone; failures reach every waiter."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from xdlabel.textqueries import TextQueries

WORDS = ["red", "circle", "blue", "square", "a", "photo", "of", "green", "triangle", "small", "large", "two"]


@pytest.fixture(scope="module")
def predictor(parity_model):  # type: ignore[no-untyped-def]
    from xdecoder import Predictor

    return Predictor(parity_model, device="cpu")


def ask_together(queries: TextQueries, texts: list[str], errors: list[BaseException] | None = None
                 ) -> list[np.ndarray]:
    """One thread per text, released at once; errors are collected in ``errors`` when given."""
    barrier = threading.Barrier(len(texts))
    out: list[np.ndarray | None] = [None] * len(texts)
    failed: list[BaseException] = [] if errors is None else errors

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = queries.vectors([texts[i]])[0]
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            failed.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if failed and errors is None:
        raise failed[0]
    return [o for o in out if o is not None]


def test_concurrent_texts_are_batched_and_equal_encoding_alone(predictor) -> None:  # type: ignore[no-untyped-def]
    """3 seeded rounds of 40 threads over 10 distinct texts (repeats included)."""
    rng = np.random.default_rng(4)
    for round_ in range(3):
        distinct = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))) + f" {round_}" for _ in range(10)]
        texts = [distinct[i] for i in rng.integers(0, len(distinct), 40)]
        queries = TextQueries(predictor.text_query_embeddings, threading.Lock(), window=0.05)
        got = ask_together(queries, texts)
        alone = {t: predictor.text_query_embeddings([t])[0] for t in set(texts)}
        for text, vector in zip(texts, got, strict=True):
            np.testing.assert_allclose(vector, alone[text], atol=2e-5)
        assert queries.calls <= 3, "concurrent texts were not encoded together"
        calls = queries.calls
        again = queries.vectors(texts[:5])  # cached: no model call
        assert queries.calls == calls and np.array_equal(again, np.stack(got[:5]))


def test_cache_is_bounded_least_recently_used_first(predictor) -> None:  # type: ignore[no-untyped-def]
    queries = TextQueries(predictor.text_embeddings, threading.Lock(), size=5, window=0)
    for i in range(20):
        queries.vectors([f"thing {i}"])
    assert queries.calls == 20 and len(queries._cache) == 5
    queries.vectors(["thing 19", "thing 15"])
    assert queries.calls == 20
    queries.vectors(["thing 0"])  # dropped long ago
    assert queries.calls == 21


def test_a_failed_model_call_reaches_every_waiter_and_the_next_call_works(predictor) -> None:  # type: ignore[no-untyped-def]
    """The model call fails (injected) for 4 of 8 seeded rounds of 12 concurrent threads: every
    thread of a failed round gets the error (none hangs), and the next round encodes normally."""
    failing = {"on": False}

    def encode(texts: list[str]) -> np.ndarray:
        if failing["on"]:
            raise RuntimeError("injected encoder failure")
        return predictor.text_embeddings(texts)  # type: ignore[no-any-return]

    queries = TextQueries(encode, threading.Lock(), window=0.02)
    rng = np.random.default_rng(9)
    for round_ in range(8):
        failing["on"] = round_ % 2 == 0
        texts = [f"shape {round_} {int(i)}" for i in rng.integers(0, 4, 12)]
        if failing["on"]:
            errors: list[BaseException] = []
            ask_together(queries, texts, errors)
            assert len(errors) == len(texts) and all("injected" in str(e) for e in errors)
            assert not queries._inflight and not queries._pending
        else:
            got = ask_together(queries, texts)
            np.testing.assert_allclose(np.stack(got), predictor.text_embeddings(texts), atol=2e-5)
