"""bench.bench_context: the search for the longest sequence that fits, the targets, and the command on the CPU."""

import copy
import json
import math
import subprocess

import pytest

from bench import bench_context
from bench.bench_context import search_max_tokens


class FakeClock:
    """A clock that advances only when a trial runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def threshold(limit, clock=None, seconds=0.0):
    """A monotone predicate: fits up to ``limit`` tokens; each call takes ``seconds`` of ``clock``."""
    calls = []

    def fits(n):
        calls.append(n)
        if clock is not None:
            clock.now += seconds
        return n <= limit

    return fits, calls


@pytest.mark.parametrize("limit", [8191, 8192, 50_000, 123_457, 350_000, 700_001])
@pytest.mark.parametrize("resolution", [1024, 4096])
def test_monotone_predicate(limit, resolution):
    fits, calls = threshold(limit)
    s = search_max_tokens(fits, 8192, resolution, 1 << 20, 1e9)
    assert s.stopped == "resolved"
    assert s.fitted <= limit < s.failed and s.failed - s.fitted <= resolution
    assert [t["tokens"] for t in s.trials] == calls and len(set(calls)) == len(calls)  # nothing tried twice
    assert all(t["fits"] == (t["tokens"] <= limit) for t in s.trials)
    # doubling then bisection: about log2(range / resolution) trials on each side
    assert len(calls) <= 2 * (1 << 20).bit_length() - resolution.bit_length() + 2
    assert all(n % resolution == 0 for n in calls)  # from a multiple of the resolution, every point is one


def test_a_coarser_resolution_takes_fewer_trials():
    fine, coarse = (search_max_tokens(threshold(300_000)[0], 8192, r, 1 << 20, 1e9) for r in (1024, 16384))
    assert len(coarse.trials) < len(fine.trials)
    assert coarse.failed - coarse.fitted <= 16384 and fine.failed - fine.fitted <= 1024


def test_always_fails():
    fits, calls = threshold(0)
    s = search_max_tokens(fits, 8192, 1024, 1 << 20, 1e9)
    assert s.fitted is None and s.failed == 1024 and s.stopped == "nothing fits"
    assert calls == [8192, 4096, 2048, 1024]  # halving down to the resolution


def test_always_fits_up_to_the_limit():
    fits, calls = threshold(10**9)
    s = search_max_tokens(fits, 8192, 1024, 100_000, 1e9)
    assert s.fitted == 100_000 and s.failed is None and s.stopped == "limit"
    assert calls == [8192, 16384, 32768, 65536, 100_000]  # the last doubling clipped to the limit
    s = search_max_tokens(threshold(10**9)[0], 200_000, 1024, 100_000, 1e9)
    assert s.fitted == 100_000 and len(s.trials) == 1  # a start beyond the limit starts at the limit


def test_a_limit_between_the_resolution_steps():
    s = search_max_tokens(threshold(99_000)[0], 8192, 1024, 100_000, 1e9)
    assert s.stopped == "resolved" and s.fitted <= 99_000 < s.failed <= 100_000 and s.failed - s.fitted <= 1024


def test_the_budget_stops_the_search_with_the_best_bounds():
    clock = FakeClock()
    fits, calls = threshold(50_000, clock, seconds=10.0)
    s = search_max_tokens(fits, 8192, 1024, 1 << 20, 35.0, clock=clock)
    # after 3 trials (30 s) a fourth (10 s, like the longest so far) would end past 35 s
    assert s.stopped == "budget" and calls == [8192, 16384, 32768]
    assert s.fitted == 32768 and s.failed is None and s.seconds == 30.0
    assert search_max_tokens(fits, 8192, 1024, 1 << 20, 0.0, clock=clock).trials == []


def test_known_bounds_and_a_predicted_start():
    # a smaller cap fit 40,960 and a larger one failed at 200,000: neither is tried again
    fits, calls = threshold(101_000)
    s = search_max_tokens(fits, 8192, 1024, 1 << 20, 1e9, lower=40_960, upper=200_000)
    assert 40_960 not in calls and 200_000 not in calls and min(calls) > 40_960 and max(calls) < 200_000
    assert s.fitted <= 101_000 < s.failed and s.failed - s.fitted <= 1024
    # galloping from a close prediction takes fewer trials than doubling from scratch
    guessed = search_max_tokens(threshold(101_000)[0], 99_328, 1024, 1 << 20, 1e9, lower=40_960, step=3072)
    scratch = search_max_tokens(threshold(101_000)[0], 8192, 1024, 1 << 20, 1e9)
    assert guessed.fitted == scratch.fitted and len(guessed.trials) < len(scratch.trials)
    # and from one too high it gallops down
    high = search_max_tokens(threshold(101_000)[0], 110_592, 1024, 1 << 20, 1e9, step=3072)
    assert high.trials[0]["fits"] is False and high.fitted == scratch.fitted
    assert search_max_tokens(threshold(0)[0], 8192, 1024, 1 << 20, 1e9, lower=1 << 20).stopped == "limit"


def test_an_unknown_trial_ends_the_search():
    answers = iter([True, None])
    s = search_max_tokens(lambda n: next(answers), 8192, 1024, 1 << 20, 1e9)
    assert s.stopped == "inconclusive" and s.fitted == 8192 and s.failed is None and len(s.trials) == 2
    with pytest.raises(ValueError):
        search_max_tokens(lambda n: True, 8192, 0, 1 << 20, 1e9)


def test_predicted_tokens():
    gib = 2**30
    points = [(8192, 6 * gib), (16384, 8 * gib)]  # 2 GiB per 8192 tokens above 4 GiB
    assert bench_context.predicted_tokens(points, 16 * gib) == 49152
    assert bench_context.predicted_tokens(points[:1], 16 * gib) is None
    assert bench_context.predicted_tokens([(8192, 6 * gib), (16384, 6 * gib)], 16 * gib) is None


def test_long_row():
    row = bench_context.long_row(1001, 512)
    assert len(row["input_ids"]) == len(row["assistant_masks"]) == 1001 and all(row["assistant_masks"])
    assert row["input_ids"][0] == 1 and row["input_ids"][-1] == 2 and row["input_ids"][500] == 3
    half = bench_context.long_row(1001, 512, "assistant")["assistant_masks"]
    assert half[:501] == [0] * 501 and half[501:] == [1] * 500


def test_targets_come_from_the_rows():
    fixed = [{"provider": "trl", "checkpointing": "plain", "peak_GiB": 9.0},
             {"provider": "fastsft", "checkpointing": "plain", "peak_GiB": 7.4},
             {"provider": "fastsft", "checkpointing": "offload", "peak_GiB": 6.5}]
    context = [{"provider": "fastsft", "cap_GiB": 80, "fitted_tokens": 352_256, "failed_tokens": 353_280},
               {"provider": "trl", "cap_GiB": 80, "fitted_tokens": 400_000, "failed_tokens": None}]
    t = bench_context.targets(fixed, context, True)
    assert t["peak_2048x2"]["met"] is True and t["peak_2048x2"]["checkpointing"] == "offload"
    assert t["context_80"]["met"] is True and t["context_80"]["fastsft_fitted_tokens"] == 352_256
    context[0].update(fitted_tokens=300_000, failed_tokens=340_000)
    assert bench_context.targets([], context, True)["context_80"]["met"] is False
    context[0].update(fitted_tokens=300_000, failed_tokens=None)  # the budget ran out in between
    assert bench_context.targets([], context, True)["context_80"]["met"] is None
    assert bench_context.targets(fixed[:2], [], True)["peak_2048x2"]["met"] is False
    assert bench_context.targets(fixed, context, False)["peak_2048x2"]["met"] is None  # not the real 8B on a GPU


@pytest.mark.slow
def test_max_context_on_the_cpu(tmp_path):
    # N above 200 is a pretend OOM; N = 128 runs a real step of each provider in its own process
    bench_context.main(["--max-context", "--model", "tiny", "--providers", "trl,fastsft", "--fastsft-modes", "offload",
                        "--caps", "24,16", "--start", "128", "--resolution", "128", "--cpu-fake-limit", "200",
                        "--out", str(tmp_path)])
    data = json.loads((tmp_path / "context_tiny_max.json").read_text())
    assert data["caps_GiB"] == [16, 24] and data["fake_limit"] == 200
    rows = {(r["provider"], r["checkpointing"], r["cap_GiB"]): r for r in data["rows"]}
    assert set(rows) == {(p, m, c) for p, m in [("trl", "plain"), ("fastsft", "offload")] for c in (16, 24)}
    for (_, _, cap), row in rows.items():
        assert row["error"] is None, row
        assert row["fitted_tokens"] == 128 and row["failed_tokens"] == 256 and row["stopped"] == "resolved"
        ran = [t for t in row["trial_log"] if t.get("error") != "fake limit"]
        # under the larger cap, what fit under the smaller one is known: no process runs
        assert len(ran) == (1 if cap == 16 else 0) and all(t["fits"] and t["step_s"] > 0 for t in ran)
        assert all(t["rank"] == 32 and (t["patched"] is None) == (row["provider"] == "trl") for t in ran)
        assert all("fused_cross_entropy" in t["patched"] for t in ran if row["provider"] == "fastsft")
    assert data["targets"]["context_80"]["met"] is None  # a tiny model on the CPU measures nothing
    assert "| fastsft | offload | 16 | 128 | 256 | resolved |" in (tmp_path / "context_tiny_max.md").read_text()

    # a second run continues from the first: every search is resolved already, nothing runs
    bench_context.main(["--max-context", "--model", "tiny", "--providers", "fastsft", "--fastsft-modes", "offload",
                        "--caps", "16", "--resolution", "128", "--cpu-fake-limit", "200", "--name", "again",
                        "--resume", str(tmp_path / "context_tiny_max.json"), "--out", str(tmp_path)])
    again = json.loads((tmp_path / "again_max.json").read_text())["rows"]
    first = rows[("fastsft", "offload", 16)]
    assert len(again) == 4 and again[0]["fitted_tokens"] == 128
    # no new trial; the row counts the earlier run's
    assert again[0]["trial_log"] == first["trial_log"] and again[0]["trials"] == len(first["trial_log"]) > 0


@pytest.mark.slow
def test_fixed_on_the_cpu(tmp_path):
    bench_context.main(["--fixed", "--model", "tiny", "--providers", "fastsft", "--fastsft-modes", "offload",
                        "--max-length", "256", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "context_tiny_fixed.json").read_text())
    (row,) = data["rows"]
    assert "error" not in row, row
    assert row["provider"] == "fastsft" and row["checkpointing"] == "offload" and row["rank"] == 32
    assert row["tokens_per_s"] > 0 and row["batch"] == 2 and row["max_length"] == 256
    assert row["fallbacks"] == {}  # every kernel ran the backend auto chose
    assert data["targets"]["peak_2048x2"]["met"] is None


def test_offload_tiled_mode_and_default_modes():
    spec = {"checkpointing": "offload-tiled", "model": "tiny", "checkpoint": None}
    a = bench_context._namespace(spec)
    assert a.checkpointing == "offload" and a.tiled_mlp is True
    assert bench_context._namespace(dict(spec, checkpointing="offload")).tiled_mlp is False
    assert bench_context._namespace(dict(spec, checkpointing="plain")).checkpointing is True
    assert set(bench_context.FIXED_MODES) | set(bench_context.CONTEXT_MODES) == set(bench_context.FASTSFT_MODES)
    assert bench_context.CONTEXT_MODES[0] == "offload-tiled"


@pytest.mark.slow
def test_offload_tiled_trial_on_the_cpu(tmp_path):
    bench_context.main(["--max-context", "--model", "tiny", "--providers", "fastsft", "--caps", "16", "--start", "128",
                        "--resolution", "128", "--cpu-fake-limit", "200", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "context_tiny_max.json").read_text())["rows"]
    assert [r["checkpointing"] for r in rows] == ["offload-tiled", "offload"]  # the default --max-context modes
    ran = {r["checkpointing"]: [t for t in r["trial_log"] if t.get("error") != "fake limit"] for r in rows}
    assert ran["offload-tiled"][0]["fits"] and ran["offload-tiled"][0]["tiled_mlps"] == 2  # both layers' MLPs
    assert ran["offload"][0]["tiled_mlps"] == 0


def test_resume_merges_runs_split_across_gpus(tmp_path):
    def row(provider, cap, fitted):
        return {"mode": "max_context", "provider": provider, "checkpointing": "plain", "cap_GiB": cap,
                "fitted_tokens": fitted, "trial_log": []}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [row("trl", 16, 100), row("trl", 24, 200), {"mode": "fixed"}]}))
    b.write_text(json.dumps({"rows": [row("trl", 24, 300), row("fastsft", 80, 400)]}))
    merged = bench_context._resumed([a, b])
    assert set(merged) == {("trl", "plain", 16), ("trl", "plain", 24), ("fastsft", "plain", 80)}
    assert merged[("trl", "plain", 24)]["fitted_tokens"] == 300  # as many trials (none): the later file wins
    assert bench_context._resumed(None) == {}


def test_each_case_process_gets_the_allocator_setting(monkeypatch):
    seen = []

    def fake_run(cmd, env, **kwargs):
        seen.append(env.get("PYTORCH_CUDA_ALLOC_CONF"))
        return subprocess.CompletedProcess(cmd, 1, "", "boom")

    monkeypatch.setattr(bench_context.subprocess, "run", fake_run)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    bench_context.run_case({"kind": "trial", "alloc_conf": "expandable_segments:True"})
    bench_context.run_case({"kind": "trial", "alloc_conf": None})  # PyTorch's default: the variable is dropped
    bench_context.run_case({"kind": "trial"})  # no setting in the spec: the environment's own
    assert seen == ["expandable_segments:True", None, "garbage_collection_threshold:0.6"]


def test_every_trial_is_written_as_it_ends(monkeypatch):
    # a run killed from outside during a long trial keeps the trials before it
    monkeypatch.setattr(bench_context, "run_case",
                        lambda spec, timeout=None: {"fits": spec["tokens"] <= 300, "peak_reserved_GiB": 1.0})
    a = bench_context.argparse.Namespace(
        time_budget=math.inf, resume=None, providers="fastsft", fastsft_modes="offload", start=128, step=None,
        resolution=64, limit=1024, model="tiny", alloc_conf=None, loss_on="all")
    written = []
    rows = bench_context.run_max_context(a, None, [16], None, lambda r: written.append(copy.deepcopy(r)))
    assert [w[0]["stopped"] for w in written[:-1]] == ["running"] * (len(written) - 1)
    assert [(w[0]["fitted_tokens"], w[0]["failed_tokens"]) for w in written[:3]] == [(128, None), (256, None),
                                                                                     (256, 512)]
    assert [len(w[0]["trial_log"]) for w in written[:-1]] == list(range(1, len(written)))
    assert written[-1] == rows and rows[0]["stopped"] == "resolved" and rows[0]["fitted_tokens"] == 256


def test_merge_writes_one_table_from_runs_on_another_machine(tmp_path):
    env = {"card": "NVIDIA H200", "cuda": "13.0", "versions": {"torch": "2.11.0"}}

    def run(name, commit, date, rows):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"environment": {**env, "commit": commit, "date": date}, "rank": 32,
                                    "alloc_conf": "expandable_segments:True", "fake_limit": None, "rows": rows}))
        return path

    def row(provider, cap, fitted, trials):
        return {"mode": "max_context", "provider": provider, "checkpointing": "offload-tiled", "cap_GiB": cap,
                "fitted_tokens": fitted, "failed_tokens": None, "loss_on": "all",
                "trial_log": [{"tokens": fitted, "fits": True}] * trials}

    # the second call resumed the first, so its file carries the first's stale rows too
    first = run("a", "c1", "2026-11-28T18:30:00+00:00", [row("fastsft", 80, 350_000, 1), row("fastsft", 40, 1, 1)])
    second = run("b", "c2", "2026-11-28T18:40:00+00:00", [row("fastsft", 40, 311_296, 2), row("fastsft", 80, 1, 0)])
    bench_context.main(["--merge", "--resume", str(first), str(second), "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "context_llama-8b_max.json").read_text())
    assert data["environment"]["card"] == "NVIDIA H200" and data["environment"]["commit"] == "c1+c2"
    assert data["environment"]["date"] == "2026-11-28T18:30:00+00:00 to 2026-11-28T18:40:00+00:00"
    assert [(r["cap_GiB"], r["fitted_tokens"]) for r in data["rows"]] == [(40, 311_296), (80, 350_000)]
    assert data["targets"]["context_80"]["met"] is True and data["merged_from"] == ["a.json", "b.json"]
    assert "| fastsft | offload-tiled | 40 | 311296 |" in (tmp_path / "out" / "context_llama-8b_max.md").read_text()

    env["versions"] = {"torch": "2.12.0"}
    other = run("c", "c3", "2026-11-28T19:00:00+00:00", [])
    with pytest.raises(SystemExit, match="differ in versions"):
        bench_context.main(["--merge", "--resume", str(first), str(other), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        bench_context.main(["--merge", "--out", str(tmp_path)])  # nothing to merge


def test_a_step_that_is_not_positive_is_refused(capsys):
    for bad in ("0", "-4096"):
        with pytest.raises(SystemExit):
            bench_context.main(["--max-context", "--model", "tiny", "--step", bad, "--cpu-fake-limit", "200"])
        assert f"--step must be a positive number of tokens, got {bad}" in capsys.readouterr().err
