"""bench/compressed.py runs end to end (small, so it is quick): every row is there, flat is exact, and
the compressed index's default search (target 0.95, nothing hand-set) reaches its target."""

from __future__ import annotations

from bench import compressed


def test_compressed_table_runs_and_meets_the_target() -> None:
    rows = {r["path"].split(" (")[0].split(" x")[0]: r for r in compressed.run(4000, 60, dim=64)}
    assert rows["raw FAISS flat"]["recall"] == 1.0
    assert rows["xdlabel default"]["recall"] == 1.0  # 4000 vectors: under exact_max, flat
    kinds = [r for p, r in rows.items() if p.startswith("xdlabel IVF-PQ")]
    assert len(kinds) == 2  # with the learned rotation (OPQ) and without
    for pq in kinds:
        assert pq["recall"] >= 0.95
        assert pq["ram_b"] < rows["raw FAISS flat"]["ram_b"] and pq["disk_b"] == 4 * 64
    assert any(p.startswith("raw FAISS same OPQ + IVF-PQ") for p in rows)
