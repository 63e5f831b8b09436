"""bench.bench_sft: the FLOP count behind MFU/HFU, a tiny CPU run of the whole command, and the unsloth provider
(on a stand-in for Unsloth: ``fake_unsloth``)."""

import json
import os

import fake_unsloth
import pytest

from bench import bench_sft


def test_flop_per_token_matches_the_published_counts():
    # Llama-3.1-8B at 2048 tokens, LoRA r=16 on all linear layers: about 32 GFLOP per token, 46 with
    # gradient checkpointing's recomputation
    flop = bench_sft.flop_per_token("llama-8b", [2048] * 4)
    assert flop["model"] / 1e9 == pytest.approx(32.2, abs=0.1)
    assert flop["hardware"] / 1e9 == pytest.approx(46.7, abs=0.1)
    assert flop["attention_pairs_per_token"] == 1024.5
    plain = bench_sft.flop_per_token("llama-8b", [2048], checkpointing=False)
    assert plain["hardware"] == plain["model"] == flop["model"]
    # attention over the pairs inside each example: packed short examples cost less than one long row
    short = bench_sft.flop_per_token("llama-8b", [512] * 4)
    assert short["model"] < flop["model"]
    assert bench_sft.flop_per_token("llama-8b", [2048], rank=0)["model"] < flop["model"]


def test_utilization():
    flop = {"model": 32e9, "hardware": 46e9}
    row = {"tokens_per_s": 10_000.0}
    out = bench_sft.utilization(row, flop, 800.0)
    assert out["mfu"] == pytest.approx(0.4) and out["hfu"] == pytest.approx(0.575)
    assert out["gflop_per_token"] == 32.0
    assert "mfu" not in bench_sft.utilization(row, flop, None)  # no GPU, no rate
    assert "mfu" not in bench_sft.utilization({"error": "x"}, flop, 800.0)


def test_step_times_show_a_slow_step():
    # (step, seconds, tokens seen): steps of 0.1 s at 1,000 tokens, one of 0.5 s
    marks = [(2, 1.0, 0), (3, 1.1, 1000), (4, 1.6, 2000), (5, 1.7, 3000)]
    out = bench_sft.step_times(marks)
    assert out["step_ms"] == pytest.approx([100, 500, 100])
    assert out["step_ms_median"] == pytest.approx(100) and out["step_ms_max"] == pytest.approx(500)
    assert out["median_step_tokens_per_s"] == pytest.approx(10_000)  # the overall rate is 3000 / 0.7 s
    assert bench_sft.step_times(marks[:1]) == {}


@pytest.mark.slow
def test_tiny_run_on_the_cpu(tmp_path):
    bench_sft.main(["--model", "tiny", "--providers", "fastsft", "--warmup", "1", "--steps", "1", "--batch", "2",
                    "--seq-len", "512", "--packing", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "sft_tiny_packing_512.json").read_text())
    (row,) = data["rows"]
    assert "error" not in row, row
    assert row["tokens_per_s"] > 0 and row["max_length"] == 512 and row["qlora"] is False
    assert len(row["step_ms"]) == 1 and row["median_step_tokens_per_s"] > 0
    # --compare against an earlier result: the same run read as 10x faster before is a regression
    old = tmp_path / "old.json"
    data["rows"][0]["tokens_per_s"] *= 10
    old.write_text(json.dumps(data))
    again = ["--model", "tiny", "--providers", "fastsft", "--warmup", "1", "--steps", "1", "--batch", "2",
             "--seq-len", "512", "--packing", "--out", str(tmp_path / "again"), "--compare", str(old)]
    assert bench_sft.main(again) == 1
    assert row["gflop_per_token"] > 0 and "mfu" not in row  # no matmul rate without a GPU
    assert data["gflop_per_token"] == row["gflop_per_token"]


def test_e2e_is_the_sft_bench_under_its_short_name():
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "bench.e2e", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout and "stock TRL, TRL with Liger, fastsft and Unsloth" in out.stdout


def test_compare_with_a_missing_file_is_rejected_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_sft.main(["--model", "tiny", "--providers", "fastsft", "--out", str(tmp_path),
                        "--compare", str(tmp_path / "missing.json")])
    assert "--compare" in capsys.readouterr().err and not list(tmp_path.glob("*.json"))


TINY = ["--model", "tiny", "--warmup", "1", "--steps", "3", "--batch", "2", "--seq-len", "512", "--packing"]


@pytest.mark.slow
def test_unsloth_from_its_own_site_trains_like_trl(tmp_path, monkeypatch):
    """The unsloth provider's whole path (a child process, the saved random model, FastLanguageModel's two calls,
    TRL's trainer) on a stand-in Unsloth: same weights, same initial adapters, same data give the same losses."""
    monkeypatch.delenv(bench_sft.UNSLOTH_SITE_ENV, raising=False)
    site = fake_unsloth.write_site(tmp_path / "usite")
    bench_sft.main([*TINY, "--providers", "trl,unsloth", "--unsloth-site", str(site), "--out", str(tmp_path)])
    trl_row, unsloth_row = json.loads((tmp_path / "sft_tiny_packing_512.json").read_text())["rows"]
    assert "error" not in unsloth_row, unsloth_row
    assert unsloth_row["provider"] == "unsloth" and unsloth_row["tokens_per_s"] > 0
    assert len(unsloth_row["step_ms"]) == 3 and unsloth_row["gflop_per_token"] == trl_row["gflop_per_token"]
    assert len(unsloth_row["first_losses"]) == 4
    # equal to float32 rounding on the CPU; with another adapter seed (random_state=1) the second loss moves by
    # about 1.5e-6 of itself, the first not at all (LoRA's B starts at zero)
    assert unsloth_row["first_losses"] == pytest.approx(trl_row["first_losses"], rel=1e-7, abs=0)
    # the versions of the child's site, beside the run's own (the file's environment)
    assert unsloth_row["versions"]["unsloth"] == fake_unsloth.VERSION and unsloth_row["versions"]["trl"]
    assert "versions" not in trl_row


def test_unsloth_without_a_site_or_a_package_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(bench_sft.UNSLOTH_SITE_ENV, raising=False)
    monkeypatch.setattr(bench_sft, "unsloth_importable", lambda: False)
    monkeypatch.setattr(bench_sft, "matmul_tflops", lambda: None)
    assert bench_sft.main([*TINY, "--providers", "unsloth", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "sft_tiny_packing_512.json").read_text())["rows"]
    assert "not importable" in row["skipped"] and "--unsloth-site" in row["skipped"]
    assert "tokens_per_s" not in row and "error" not in row
    assert "skipped" in (tmp_path / "sft_tiny_packing_512.md").read_text()  # a column of the table
    assert "'skipped'" in capsys.readouterr().out


def test_an_unsloth_site_without_unsloth_is_rejected_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_sft.main([*TINY, "--providers", "unsloth", "--unsloth-site", str(tmp_path), "--out", str(tmp_path)])
    assert "--unsloth-site" in capsys.readouterr().err and not list(tmp_path.glob("*.json"))


def test_unsloth_site_comes_first_and_other_trl_sites_go(tmp_path, monkeypatch):
    site = fake_unsloth.write_site(tmp_path / "usite")
    (site / "trl").mkdir()  # its own, older trl
    newer = tmp_path / "site"
    (newer / "trl").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    path = os.pathsep.join([str(newer), str(other), str(site)])
    env = bench_sft.unsloth_env(site, {"PYTHONPATH": path, "HOME": "/home/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(site.resolve()), str(other)]
    assert env["HOME"] == "/home/x"
    assert bench_sft.unsloth_env(site, {})["PYTHONPATH"] == str(site.resolve())
    monkeypatch.setenv(bench_sft.UNSLOTH_SITE_ENV, str(site))
    assert bench_sft.build_parser().parse_args([]).unsloth_site == site  # the option's default


def test_the_suites_end_to_end_rows_run_unsloth_beside_trl_and_liger():
    from bench import suite

    for part in (p for parts in suite.PRESETS.values() for p in parts.values()):
        for entry in (e for e in part if e.argv[0] == "bench.bench_sft"):
            providers = bench_sft.build_parser().parse_args(list(entry.argv[1:])).providers.split(",")
            assert {"trl", "trl-liger", "fastsft", "unsloth"} <= set(providers), entry.name
            assert providers[-1] == "unsloth"  # last: a run stopped at its cap keeps the other rows


def test_results_are_written_after_every_provider(tmp_path, monkeypatch):
    """A run stopped while a provider runs (the suite's time cap) keeps the rows of those that finished."""
    def run_child(provider, argv, extra_args, env=None):
        if provider == "trl-liger":
            raise KeyboardInterrupt  # stands in for the cap's SIGTERM
        return {"provider": provider, "tokens_per_s": 1000.0}

    monkeypatch.setattr(bench_sft, "run_child", run_child)
    monkeypatch.setattr(bench_sft, "matmul_tflops", lambda: None)
    with pytest.raises(KeyboardInterrupt):
        bench_sft.main([*TINY, "--providers", "trl,trl-liger,fastsft", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "sft_tiny_packing_512.json").read_text())["rows"]
    assert row["provider"] == "trl" and row["tokens_per_s"] == 1000.0


def test_fastsft_eager_runs_the_layers_eagerly_beside_the_default(tmp_path):
    bench_sft.main([*TINY, "--providers", "fastsft,fastsft-eager", "--out", str(tmp_path)])
    default, eager = json.loads((tmp_path / "sft_tiny_packing_512.json").read_text())["rows"]
    assert (default["provider"], eager["provider"]) == ("fastsft", "fastsft-eager")
    # on the CPU the graphs are not captured (CUDA only): the default says so, the eager row has none
    assert "captured layers" in default["captured_layers"] and "captured_layers" not in eager
    assert default["first_losses"] == pytest.approx(eager["first_losses"], rel=1e-6)


def test_an_unknown_provider_is_rejected_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_sft.main([*TINY, "--providers", "fastsft,fastsoft", "--out", str(tmp_path)])
    assert "unknown fastsoft" in capsys.readouterr().err


def test_capture_options_reach_the_fastsft_providers_that_capture(tmp_path):
    a = bench_sft.build_parser().parse_args([*TINY, "--capture-options", '{"mlp_tile_tokens": 64}'])
    layers = {p: bench_sft.make_trainer(p, a, str(tmp_path / p), []).captured_layers
              for p in ("fastsft", "fastsft-full-recompute", "fastsft-eager")}
    assert (layers["fastsft"].mlp_gradients_only, layers["fastsft"].mlp_tile_tokens) == (True, 64)
    full = layers["fastsft-full-recompute"]
    assert (full.mlp_gradients_only, full.mlp_tile_tokens) == (False, 64)
    assert layers["fastsft-eager"] is None
