"""bench.bench_sft: the FLOP count behind MFU/HFU, and a tiny CPU run of the whole command."""

import json

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
    assert "--model" in out.stdout and "stock TRL, TRL with Liger, and fastsft" in out.stdout


def test_compare_with_a_missing_file_is_rejected_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_sft.main(["--model", "tiny", "--providers", "fastsft", "--out", str(tmp_path),
                        "--compare", str(tmp_path / "missing.json")])
    assert "--compare" in capsys.readouterr().err and not list(tmp_path.glob("*.json"))
