"""bench/search.py's peer table runs end to end (small and low-dimensional, so it is quick): every
row is there, exact rows are exact, and the store's restart loads its saved index without a rebuild."""

from __future__ import annotations

import math

import pytest

from bench import search_realistic


def test_peer_table_runs_and_the_restart_does_not_rebuild(capsys: pytest.CaptureFixture[str]) -> None:
    rows = search_realistic.run(3000, 40, dim=64)
    by_path = {r["path"]: r for r in rows}
    assert by_path["raw FAISS flat (exact)"]["recall"] == 1.0
    # 3000 vectors: under exact_max, so xdlabel's index is flat, and so exact with and without filters
    default = next(r for p, r in by_path.items() if p.startswith("xdlabel VectorIndex default (flat"))
    assert default["recall"] == 1.0
    assert by_path["xdlabel VectorIndex filter 1%"]["recall"] == 1.0
    assert by_path["xdlabel VectorIndex filter 10%"]["recall"] == 1.0
    assert any(p.startswith("raw FAISS IVF-PQ8 + exact re-rank") for p in by_path)
    assert any(p.startswith("raw FAISS HNSW32") for p in by_path)
    graph = next(r for p, r in by_path.items() if p.startswith("xdlabel VectorIndex graph=True (hnsw"))
    raw_graph = next(r for p, r in by_path.items() if p.startswith("raw FAISS same HNSW32"))
    assert graph["recall"] >= 0.95 and graph["recall"] == raw_graph["recall"]  # the same graph, the same beam
    assert by_path["xdlabel VectorIndex graph=True filter 1%"]["recall"] == 1.0
    assert by_path["xdlabel VectorIndex graph=True filter 10%"]["recall"] == 1.0
    databases = ["SQLite"] + (["PostgreSQL"] if any("PostgreSQL" in p for p in by_path) else [])
    for db in [*databases, *(f"{db} graph=True" for db in databases)]:
        assert by_path[f"xdlabel store {db}: default (recall target 0.95)"]["recall"] == 1.0
        for share in (1, 10):
            assert by_path[f"xdlabel store {db}: filter {share}%"]["recall"] == 1.0
        restart = by_path[f"xdlabel store {db}: restart: saved index + id map"]
        assert restart["note"].endswith("loaded, no rebuild"), restart["note"]
        assert math.isfinite(restart["build_s"])
    search_realistic.print_table(rows)
    assert "xdlabel store SQLite: restart" in capsys.readouterr().out
