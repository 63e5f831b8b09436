"""bench/kernels' measuring logic on the CPU: the input ring, percentiles, round planning, a whole measurement
through pytest-benchmark, and its JSON turned into result rows that bench.report takes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.kernels import collect, timing

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def test_ring_size_fills_the_cache_between_uses():
    mib = 2**20
    assert timing.ring_size(29 * mib, 50 * mib) == 3  # two others (58 MiB) pass between uses of one
    assert timing.ring_size(128 * mib, 50 * mib) == 2  # never fewer than two
    assert timing.ring_size(mib, 50 * mib) == 8  # capped
    assert timing.ring_size(0, 50 * mib) == 2
    assert timing.nbytes((torch.zeros(10), {"a": torch.zeros(4, dtype=torch.int64)}, "x")) == 40 + 32
    t = torch.zeros(8)
    assert timing.nbytes((t, t[2:])) == 32  # one storage counted once


def test_ring_cycles_distinct_sets_and_clears_grads():
    made = iter(range(100))
    shared = torch.ones(2, requires_grad=True)
    ring = timing.Ring([(torch.full((3,), float(next(made)), requires_grad=True),) for _ in range(3)], [shared])
    seen = []
    for _ in range(7):
        (x,) = ring.next()
        assert x.grad is None and shared.grad is None
        (x * shared.sum()).sum().backward()
        seen.append(int(x[0]))
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    args, kwargs = ring.setup()
    assert int(args[0][0]) == 1 and kwargs == {}
    # build: distinct sets from the factory, as many as the (absent) cache asks for
    ring = timing.Ring.build(lambda: (torch.randn(4),), CPU)
    assert len(ring.sets) == 2 and not torch.equal(ring.sets[0][0], ring.sets[1][0])


def test_percentiles_and_summary_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 101):
        xs = rng.random(n).tolist()
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            assert timing.percentile(xs, q) == pytest.approx(float(np.percentile(xs, 100 * q)))
    s = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == {"ms": 3.0, "ms_p20": pytest.approx(1.8), "ms_p80": pytest.approx(4.2), "rounds": 5}
    with pytest.raises(ValueError):
        timing.percentile([], 0.5)


def test_plan_rounds():
    assert timing.plan_rounds(10.0, 300, 10, 100) == 30
    assert timing.plan_rounds(100.0, 300, 10, 100) == 10
    assert timing.plan_rounds(0.01, 300, 10, 100) == 100
    assert timing.plan_rounds(0.0, 300, 10, 100) == 100


def test_forward_backward_fixed_upstream():
    x = torch.randn(3, requires_grad=True)
    step = timing.forward_backward(lambda a: (a * 2, a.sum()))
    step(x)
    first = x.grad.clone()
    x.grad = None
    step(x)
    assert torch.equal(x.grad, first)  # the same upstream gradients every call


def test_run_rotates_and_records(benchmark):
    calls = []
    ring = timing.Ring([(torch.tensor(float(i)),) for i in range(3)])
    info = timing.run(benchmark, lambda x: calls.append(int(x)), ring, work={"flop": 1e9, "bytes": 1e6},
                      device=CPU, budget=timing.Budget(budget_ms=5, least=4, most=6, warmup=2))
    assert all(a != b for a, b in zip(calls, calls[1:]))  # never the same inputs twice in a row
    assert set(calls) == {0, 1, 2}
    assert 4 <= info["rounds"] <= 6 and info["ring"] == 3
    assert len(calls) == 1 + 3 + 2 + info["rounds"]  # untimed, estimate, warm-up, timed
    assert info["ms_p20"] <= info["ms"] <= info["ms_p80"]
    assert info["TFLOP/s"] == pytest.approx(1e9 / (info["ms"] * 1e-3) / 1e12)
    assert info["GB/s"] == pytest.approx(1e6 / (info["ms"] * 1e-3) / 1e9)
    assert info["wall_ms"] > 0 and "peak_extra_GiB" not in info  # no device memory on the CPU
    assert benchmark.extra_info == info


SUITE = """
import pytest, torch
from bench.kernels import timing

pytestmark = pytest.mark.benchmark(group="toy")

@pytest.mark.parametrize("tokens", [1024, 2048], ids=timing.tokens_id)
@pytest.mark.parametrize("provider", ["slow", "fast"])
def test_toy(benchmark, provider, tokens):
    n = tokens * (4 if provider == "slow" else 1)
    ring = timing.Ring.build(lambda: (torch.randn(n, 64),), torch.device("cpu"))
    timing.run(benchmark, lambda x: x @ x.T, ring, work={"flop": 2 * n * n * 64}, device=torch.device("cpu"),
               budget=timing.Budget(budget_ms=20, least=3, most=5, warmup=1))
"""


def test_pytest_benchmark_json_to_rows_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "test_toy.py").write_text(textwrap.dedent(SUITE))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_toy.py"), "-q", "-p",
                           "no:cacheprovider", f"--benchmark-json={out}", f"--rootdir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = timing.to_rows(json.loads(out.read_text()))
    env, rows = results["toy"]
    assert len(rows) == 4 and env["commit"] is not None or env["card"] is not None
    row = next(r for r in rows if r["provider"] == "slow" and r["tokens"] == 2048)
    assert list(row)[:2] == ["provider", "tokens"]  # the parameters first, then the measurements
    for key in ("ms", "ms_p20", "ms_p80", "wall_ms", "TFLOP/s", "rounds", "ring"):
        assert key in row
    assert 3 <= row["rounds"] <= 5

    results_dir = tmp_path / "results"
    assert collect.main([str(out), "--out", str(results_dir), "--report"]) == 0
    table = (results_dir / "kernels_toy.md").read_text()
    assert "| provider | tokens | ms |" in table
    text = (results_dir / "RESULTS.md").read_text()
    assert "## kernels_toy" in text and "plots/kernels_toy_ms.png" in text
    csv = (results_dir / "all_rows.csv").read_text()
    assert "kernels_toy" in csv and ",TFLOP/s," in csv and ",rounds," not in csv


def test_a_module_stopped_at_its_cap_keeps_the_cases_it_measured(tmp_path):
    """bench.suite stops an entry at its cap with SIGTERM; the kernel suite (its conftest installs
    timing.stop_on_sigterm) then ends as interrupted and pytest-benchmark writes the cases measured so far."""
    from bench import suite

    (tmp_path / "conftest.py").write_text("from bench.kernels import timing\ntiming.stop_on_sigterm()\n")
    (tmp_path / "test_capped.py").write_text(textwrap.dedent(SUITE) + textwrap.dedent("""
        def test_slow():
            import time
            time.sleep(300)
        """))
    out = tmp_path / "capped.json"
    entry = suite.Entry("capped", ("pytest", str(tmp_path / "test_capped.py"), "-q", "-p", "no:cacheprovider",
                                   f"--benchmark-json={out}", f"--rootdir={tmp_path}"), timeout_s=45)
    result = suite.run(entry, tmp_path)
    assert result["rc"] == "timeout" and result["seconds"] < 45 + suite.STOP_GRACE_S
    log = (tmp_path / "capped.log").read_text()
    assert out.exists(), log[-2000:]
    _, rows = timing.to_rows(json.loads(out.read_text()))["toy"]
    assert len(rows) == 4  # the four toy cases ran before the slow one


def test_to_rows_takes_the_suite_environment():
    data = {"machine_info": {"fastsft": {"card": "NVIDIA H200", "versions": {"torch": "2.11"}, "commit": "abc"}},
            "benchmarks": [{"group": "rms_norm", "name": "test_rms_norm[liger-16k]",
                            "params": {"provider": "liger", "tokens": 16384},
                            "extra_info": {"ms": 0.5, "ms_p20": 0.4, "ms_p80": 0.6, "peak_extra_GiB": 0.1},
                            "stats": {"median": 0.0007}},
                           {"group": None, "name": "test_x[a]", "params": {"provider": "a"}, "extra_info": {},
                            "stats": {"median": 0.002}}]}
    results = timing.to_rows(data)
    assert results["rms_norm"][0]["card"] == "NVIDIA H200"
    assert results["rms_norm"][1] == [{"provider": "liger", "tokens": 16384, "ms": 0.5, "ms_p20": 0.4,
                                       "ms_p80": 0.6, "peak_extra_GiB": 0.1}]
    assert results["test_x"][1] == [{"provider": "a", "ms": 2.0}]  # no CUDA events: pytest-benchmark's median


def test_collect_merges_module_files_and_fails_on_a_missing_one(tmp_path):
    def suite_json(group, provider):
        return {"machine_info": {"fastsft": {"card": "NVIDIA H200", "versions": {}, "commit": "abc"}},
                "benchmarks": [{"group": group, "name": f"test_{group}[{provider}]", "params": {"provider": provider},
                                "extra_info": {"ms": 1.0}, "stats": {"median": 0.001}}]}

    (tmp_path / "a.json").write_text(json.dumps(suite_json("rope", "liger")))
    (tmp_path / "b.json").write_text(json.dumps(suite_json("rms_norm", "fastsft-triton")))
    (tmp_path / "partial.json").write_text('{"machine_info": ')  # a run killed while writing
    out = tmp_path / "out"
    assert collect.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["kernels_rms_norm.json", "kernels_rope.json"]
    out2 = tmp_path / "out2"
    assert collect.main([str(tmp_path / "a.json"), str(tmp_path / "missing.json"), str(tmp_path / "partial.json"),
                         "--out", str(out2)]) == 1
    assert [p.name for p in out2.glob("*.json")] == ["kernels_rope.json"]  # what was there is still written
    with pytest.raises(SystemExit, match="rope"):
        collect.main([str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(out2)])


def test_queued_device_time_waits_longer_until_the_host_keeps_ahead():
    """The device waits (a spinning kernel) while the host enqueues the step; a round whose enqueueing took longer
    than the wait is not host-free, so the wait grows and the rounds run again."""
    import time

    from bench import harness

    waits, syncs, args = [], [], iter(range(100))
    step = lambda i: time.sleep(0.002)  # noqa: E731  2 ms of host work per step
    info = harness.queued_device_ms(step, lambda: (next(args),), 3, host_ms=0.5, mark=time.perf_counter,
                                    elapsed_ms=lambda pairs: [(b - a) * 1e3 for a, b in pairs],
                                    sleep=waits.append, sync=lambda: syncs.append(1))
    assert waits[:3] == [1.0] * 3 and len(set(waits[3:])) == 1 and waits[3] >= 4.0  # doubled past the host time
    assert info["device_covered"] and info["device_wait_ms"] == waits[-1] and len(syncs) == len(waits) == 6
    assert 2.0 <= info["device_ms_p20"] <= info["device_ms"] <= info["device_ms_p80"] < 50

    never = harness.queued_device_ms(step, lambda: (0,), 2, host_ms=0.0, mark=time.perf_counter,
                                     elapsed_ms=lambda pairs: [(b - a) * 1e3 for a, b in pairs],
                                     sleep=lambda ms: None, sync=lambda: None, tries=1)
    assert never["device_covered"] is False  # 0.1 ms of wait never covers 2 ms of host time


def test_queued_device_time_measures_the_host_time_when_not_given():
    import time

    from bench import harness

    calls, waits = [], []
    info = harness.queued_device_ms(lambda: (calls.append(1), time.sleep(0.001)), lambda: (), 2,
                                    mark=time.perf_counter, elapsed_ms=lambda pairs: [(b - a) * 1e3 for a, b in pairs],
                                    sleep=waits.append, sync=lambda: None)
    assert len(calls) == 1 + len(waits)  # one untimed step first, for the host's time
    assert waits[0] >= 2.0 and info["device_covered"]  # twice that time (>= 1 ms), enough for every round
