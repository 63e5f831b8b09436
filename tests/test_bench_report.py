"""bench.report: the generated CSV / RESULTS.md / plots, and --compare flagging regressions."""

import json

import pytest

from bench import report

pytest.importorskip("matplotlib")


def write_run(path, rows, card="NVIDIA H200"):
    path.write_text(json.dumps({"environment": {"card": card, "versions": {"torch": "2.11"}, "commit": "abc"},
                                "rows": rows}))


def test_report_writes_csv_results_and_plots(tmp_path):
    write_run(tmp_path / "linear_cross_entropy.json",
              [{"provider": "a", "tokens": 4096, "weight": "frozen", "ms": 10.0, "peak_extra_GiB": 0.2},
               {"provider": "b", "tokens": 4096, "weight": "frozen", "ms": 12.0, "peak_extra_GiB": 3.0}])
    write_run(tmp_path / "sft_llama-8b_packing.json",
              [{"provider": "fastsft", "model": "llama-8b", "tokens_per_s": 5500.0, "peak_GiB": 15.0, "mfu": 0.25,
                "hfu": 0.36, "gflop_per_token": 32.2},
               {"provider": "trl", "model": "llama-8b", "tokens_per_s": 4000.0, "peak_GiB": 17.9}])
    out = report.report(tmp_path)
    text = out.read_text()
    assert "do not edit by hand" in text
    assert "5,500 tok/s (50% of the goal), peak 15.0 GiB, MFU 25%, HFU 36%." in text
    assert "trl in the same run: 4,000 tok/s" in text
    rows = (tmp_path / "all_rows.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 + 4 + 2  # header, 2 metrics x 2 rows per file, MFU and HFU (not the FLOP count)
    assert (tmp_path / "plots" / "linear_cross_entropy_ms.png").stat().st_size > 1000


def test_compare_flags_only_regressions(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    base = {"tokens": 16384, "weight": "frozen"}
    write_run(old, [base | {"provider": "fast", "ms": 50.0}, base | {"provider": "slow", "ms": 50.0},
                    {"provider": "fastsft", "model": "1b", "tokens_per_s": 1000.0}])
    write_run(new, [base | {"provider": "fast", "ms": 40.0}, base | {"provider": "slow", "ms": 60.0},
                    {"provider": "fastsft", "model": "1b", "tokens_per_s": 900.0}])
    found = report.compare(old, new, threshold=0.05)
    assert len(found) == 2
    assert any("slow" in line and "ms 50 -> 60" in line for line in found)
    assert any("tokens_per_s" in line for line in found)
    assert report.main(["--compare", str(old), str(new)]) == 1
    assert report.main(["--compare", str(old), str(old)]) == 0


def test_compare_matches_sft_rows_and_reads_the_median_step_rate_as_higher_is_better(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    row = {"provider": "fastsft", "model": "1b"}
    # the per-step list and the first losses differ between any two runs: still the same configuration
    write_run(old, [row | {"median_step_tokens_per_s": 1000.0, "step_ms_max": 100.0, "step_ms": [100.0, 90.0],
                           "first_losses": [2.5]}])
    write_run(new, [row | {"median_step_tokens_per_s": 1500.0, "step_ms_max": 900.0, "step_ms": [900.0, 60.0],
                           "first_losses": [2.50001]}])
    found = report.compare(old, new, threshold=0.05)
    assert len(found) == 1 and "step_ms_max" in found[0]  # the faster median step is no regression


def test_plot_labels_name_the_differing_settings_the_units_and_use_a_log_scale_when_needed():
    configs = [{"model": "llama-8b", "tokens": 4096, "packing": True, "run": "1B 4x2048"},
               {"model": "llama-8b", "tokens": 16384, "packing": False, "run": "8B 2x2048"}]
    # the model is the same in both: left out; flags as words, large numbers grouped, a run by its name
    assert report.case_labels(configs) == ["tokens 4096\npacking\n1B 4x2048", "tokens 16,384\nno packing\n8B 2x2048"]
    assert report.case_labels([{"model": "a"}, {"model": "a"}]) == ["all", "all"]
    assert report.case_labels([{"case": ["dense", 1024]}, {"case": ["packed", 8192]}]) == ["dense 1024", "packed 8192"]
    assert report.axis_label("tokens_per_s") == "tokens/s (higher is better)"
    assert report.axis_label("peak_GiB").startswith("peak memory, GiB")
    assert report.log_scale([0.5, 20.0]) and not report.log_scale([5.0, 20.0]) and not report.log_scale([0.0, 3.0])


def test_plot_titles_name_the_card_and_commit(tmp_path, monkeypatch):
    import matplotlib.axes

    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: titles.append(t) or real(self, t))
    rows = [{"provider": "a", "tokens": 1024, "ms": 0.1}, {"provider": "a", "tokens": 16384, "ms": 20.0}]
    report.plot("kernels_attention", rows, tmp_path, {"card": "NVIDIA H200", "commit": "the-commit"})
    assert titles == ["kernels attention (NVIDIA H200, commit the-commit)"]


def test_case_labels_leave_out_measured_values_that_are_not_numbers():
    rows = [{"provider": "fastsft", "memory": {"weights": 1.0}, "captured_layers": "4096 tokens", "batch": 2},
            {"provider": "unsloth", "versions": {"trl": "1.15.0"}, "batch": 2}]
    assert report.case_labels([report.split(r)[0] for r in rows]) == ["provider fastsft", "provider unsloth"]
