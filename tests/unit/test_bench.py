"""The benchmark's report functions (the measurements themselves need a GPU: `make bench`)."""

from train.bench import sweep_summary, table, window_selection


def test_sweep_summary_picks_the_fastest_and_counts_failures():
    rows = [
        {"name": "sparse_mla fwd {'BK': 64}", "config": {"BK": 64}, "ms": 52.3},
        {"name": "sparse_mla fwd {'BK': 128}", "config": {"BK": 128}, "ms": 37.6},
        {"name": "sparse_mla fwd {'BK': 256}", "config": {"BK": 256}, "error": "OutOfResources: shared memory"},
        {"name": "sparse_mla bwd {'BK': 64}", "config": {"BK": 64}, "error": "OutOfResources: shared memory"},
    ]
    lines = sweep_summary(rows).splitlines()
    assert lines[2] == "| sparse_mla bwd | - | - | 1 |"
    assert lines[3] == "| sparse_mla fwd | {'BK': 128} | 37.60 | 1 |"


def test_table_reports_errors_and_end_to_end_rows():
    results = {
        "kernels": [{"L": 8192, "name": "sparse_mla fwd", "ms": 19.1, "tflops": 215.4, "peak_gib": 0.5},
                    {"L": 131072, "name": "indexer_topk plain pytorch", "error": "out of memory"}],
        "e2e": [{"L": 65536, "name": "e2e dense step L=65536", "ms": 4762.0, "tokens_per_sec": 13762.0,
                 "total_peak_gib": 18.85}, {"name": "parameters", "total": 1083000000}],
    }
    text = table(results)
    assert "| 8,192 | sparse_mla fwd | 19.10 | 215 | 0.50 |" in text
    assert "| 131,072 | indexer_topk plain pytorch | out of memory | | |" in text
    assert "| 65,536 | e2e dense step L=65536 | 4762 | 13,762 | 18.9 |" in text


def test_window_selection_takes_the_last_k_positions():
    assert window_selection(4, 3, "cpu").tolist() == [[[0, -1, -1], [1, 0, -1], [2, 1, 0], [3, 2, 1]]]
