"""bench.profile_step: the interval math behind the GPU busy fraction, the trace analysis on a made-up trace, and
a tiny profiled run on the CPU."""

import json

import pytest

from bench import profile_step as ps


def test_union_length_counts_overlaps_once():
    assert ps.union_length([]) == 0
    assert ps.union_length([(0, 10)]) == 10
    assert ps.union_length([(0, 10), (20, 25)]) == 15  # disjoint
    assert ps.union_length([(0, 10), (5, 15)]) == 15  # overlapping
    assert ps.union_length([(0, 10), (2, 3), (4, 9)]) == 10  # nested
    assert ps.union_length([(0, 5), (5, 8)]) == 8  # touching
    assert ps.union_length([(20, 25), (0, 10), (8, 22)]) == 25  # unsorted, chained
    assert ps.union_length([(3, 3), (5, 4)]) == 0  # empty and inverted count nothing


def test_merge_and_clip():
    assert ps.merge([(5, 6), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 6)]
    assert ps.clip([(-5, 5), (2, 3), (8, 20), (20, 30), (-3, 0)], (0, 10)) == [(0, 5), (2, 3), (8, 10)]
    assert ps.clip([], (0, 10)) == []


def test_busy_fraction_clips_to_the_window():
    window = (100, 200)
    assert ps.busy_fraction([], window) == 0
    assert ps.busy_fraction([(100, 200)], window) == 1
    assert ps.busy_fraction([(0, 1000)], window) == 1  # a kernel longer than the window counts the window once
    assert ps.busy_fraction([(50, 150), (180, 300)], window) == pytest.approx(0.7)  # both ends cut
    assert ps.busy_fraction([(110, 150), (120, 130), (140, 160)], window) == pytest.approx(0.5)  # nested, overlapping
    assert ps.busy_fraction([(0, 50), (250, 300)], window) == 0  # all outside
    assert ps.busy_fraction([(0, 50)], (10, 10)) is None  # no window, no fraction


def test_largest_gaps():
    window = (0, 100)
    assert ps.largest_gaps([], window) == [(0, 100)]  # nothing ran: the window is one gap
    kernels = [(10, 20), (15, 30), (32, 60), (40, 50), (90, 95)]
    # leading 10, between 2 and 30, trailing 5; nested and overlapping kernels close no gap
    assert ps.largest_gaps(kernels, window) == [(60, 90), (0, 10), (95, 100), (30, 32)]
    assert ps.largest_gaps(kernels, window, k=2) == [(60, 90), (0, 10)]
    assert ps.largest_gaps([(-10, 5), (98, 120)], window) == [(5, 98)]  # kernels straddling the window's ends
    assert ps.largest_gaps([(0, 100)], window) == []
    assert ps.largest_gaps([(0, 10), (20, 30)], (0, 30), k=0) == []


def test_analyze_a_made_up_trace():
    ms = 1_000_000  # the trace is in ns
    trace = {
        # ProfilerStep#3 and #4: trainer steps 4 and 5
        "steps": [(3, 0, 10 * ms), (4, 10 * ms, 20 * ms)],
        # (start, end, name, linked correlation id); "gemm" straddles the steps' boundary
        "device": [(0, 4 * ms, "gemm", 7), (6 * ms, 11 * ms, "gemm", 8), (11 * ms, 20 * ms, "norm", 9),
                   (30 * ms, 31 * ms, "later", 10)],
        # (start, end, name, thread, correlation id, kind), sorted by start
        "cpu": [(0, 20 * ms, "train_step", 1, 1, "user_annotation"), (0, 1 * ms, "aten::mm", 1, 7, "cpu_op"),
                (3 * ms, 7 * ms, "aten::item", 1, 2, "cpu_op"), (4 * ms, 6 * ms, "cudaStreamSynchronize", 1, 8,
                                                                "cuda_runtime"),
                (5 * ms, 6 * ms, "aten::mm", 2, 8, "cpu_op"), (10 * ms, 11 * ms, "aten::rms_norm", 2, 9, "cpu_op")],
    }
    out = ps.analyze(trace, top=5)
    assert [s["step"] for s in out["steps"]] == [4, 5]
    assert [s["busy_fraction"] for s in out["steps"]] == [pytest.approx(0.8), pytest.approx(1.0)]
    assert out["steps"][0]["busy_ms"] == pytest.approx(8) and out["steps"][1]["device_events"] == 2
    assert out["busy_fraction_median"] == pytest.approx(0.9) and out["step_ms_median"] == pytest.approx(10)
    (gap,) = out["gaps"]  # step 5 has none
    assert gap["step"] == 4 and gap["gap_ms"] == pytest.approx(2) and gap["at_ms"] == pytest.approx(4)
    # at the gap's midpoint: thread 1 in a sync under aten::item, thread 2 (autograd's) launching the next gemm
    assert gap["cpu_ops"] == "train_step > aten::item > cudaStreamSynchronize || aten::mm"
    # the launch is found by the framework op's id, not the runtime call sharing it
    assert gap["next_kernel"] == "gemm" and gap["next_launch"] == "aten::mm"
    # events outside every active step ("later") are not counted
    assert [(k["kernel"], k["calls"]) for k in out["kernels"]] == [("gemm", 2), ("norm", 1)]
    assert out["kernels"][0]["total_ms"] == pytest.approx(9)
    assert sum(k["share"] for k in out["kernels"]) == pytest.approx(1)
    # launches per step by the framework op behind them (2 steps): aten::mm launched both gemms
    assert [(r["op"], r["events_per_step"]) for r in out["launchers"]] == [("aten::mm", 1), ("aten::rms_norm", 0.5)]
    assert out["launchers"][0]["device_ms_per_step"] == pytest.approx(4.5)
    # host self time per step (2 steps): train_step's 20 ms less aten::mm's 1 and aten::item's 4; the sync inside
    # aten::item is its own 2 ms; aten::mm summed over both threads
    host = {r["name"]: (r["self_ms_per_step"], r["calls_per_step"]) for r in out["host_self_time"]}
    assert host == {"train_step": (pytest.approx(7.5), 0.5), "aten::mm": (pytest.approx(1), 1),
                    "aten::item": (pytest.approx(1), 0.5), "cudaStreamSynchronize": (pytest.approx(1), 0.5),
                    "aten::rms_norm": (pytest.approx(0.5), 0.5)}
    assert out["host_self_time"][0]["kind"] == "user_annotation"
    assert [(t["thread"], t["busy_ms_per_step"]) for t in out["host_threads"]] == [(1, pytest.approx(10)),
                                                                                   (2, pytest.approx(1))]


def test_events_from_a_chrome_trace():
    """torch before 2.12 has no activity type on its Kineto events: the same tuples come from an exported trace."""
    def ev(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    trace = {"traceEvents": [
        ev("user_annotation", "ProfilerStep#4", 10.0, 10.0), ev("user_annotation", "ProfilerStep#3", 0.0, 10.0),
        ev("gpu_user_annotation", "ProfilerStep#3", 0.0, 10.0),  # spans idle time: not device work
        ev("kernel", "gemm", 0.5, 3.5, **{"External id": 7, "correlation": 70}),
        ev("gpu_memcpy", "Memcpy HtoD", 5.0, 1.0, **{"External id": 8}),
        ev("cpu_op", "aten::mm", 0.0, 1.0, **{"External id": 7}),
        ev("cuda_runtime", "cudaLaunchKernel", 0.2, 0.1, correlation=70),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1.0},  # not a complete event
    ]}
    out = ps.events_from_chrome_trace(trace)
    assert out["steps"] == [(3, 0, 10_000), (4, 10_000, 20_000)]
    assert out["device"] == [(500, 4_000, "gemm", 7), (5_000, 6_000, "Memcpy HtoD", 8)]
    assert out["cpu"] == [(0, 1_000, "aten::mm", 1, 7, "cpu_op"), (200, 300, "cudaLaunchKernel", 1, 70, "cuda_runtime")]
    assert ps.analyze(out)["steps"][0]["busy_fraction"] == pytest.approx(0.45)


def test_analyze_without_a_device():
    out = ps.analyze({"steps": [(1, 0, 100)], "device": [], "cpu": []}, has_device=False)
    assert out["steps"][0]["busy_fraction"] is None and out["busy_fraction_median"] is None
    assert out["gaps"] == [] and out["kernels"] == []


@pytest.mark.slow
def test_tiny_profiled_run_on_the_cpu(tmp_path):
    result = ps.main(["--model", "tiny", "--batch", "2", "--max-length", "512", "--warmup", "1", "--steps", "2",
                      "--out", str(tmp_path), "--trace", str(tmp_path / "trace")])
    data = json.loads((tmp_path / "profile_tiny_fastsft_b2_512.json").read_text())
    assert [r["step"] for r in data["rows"]] == [3, 4]  # wait 1, warm-up 1, then the active steps
    assert all(r["wall_ms"] > 0 and r["busy_fraction"] is None for r in data["rows"])
    assert data["busy_fraction_median"] is None and "no CUDA" in data["note"]
    assert data["environment"]["versions"]["trl"] and data["config"]["packing"] is True
    md = (tmp_path / "profile_tiny_fastsft_b2_512.md").read_text()
    assert "## Largest gaps" in md and "Note: no CUDA" in md
    assert (tmp_path / "trace" / "profile_tiny_fastsft_b2_512.pt.trace.json.gz").stat().st_size > 0
    assert result["step_ms_median"] > 0


@pytest.mark.slow
def test_optim_reaches_the_trainer_and_the_result_name(tmp_path, monkeypatch):
    seen = []
    real = ps.bench_sft.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        seen.append(trainer.args.optim)
        return trainer

    monkeypatch.setattr(ps.bench_sft, "make_trainer", make_trainer)
    ps.main(["--model", "tiny", "--batch", "1", "--max-length", "256", "--warmup", "1", "--steps", "1",
             "--optim", "adamw_torch_fused", "--out", str(tmp_path)])
    assert len(seen) == 1 and getattr(seen[0], "value", seen[0]) == "adamw_torch_fused"
    data = json.loads((tmp_path / "profile_tiny_fastsft_b1_256_adamw_torch_fused.json").read_text())
    assert data["config"]["optim"] == "adamw_torch_fused"
