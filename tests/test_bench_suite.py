"""The benchmark suite's presets (bench/suite.py): well-formed commands, and the runner's logging and time caps."""

import json
import sys

import pytest

from bench import bench_sft, suite


@pytest.mark.parametrize("preset,part", [(p, n) for p, parts in suite.PRESETS.items() for n in parts])
def test_preset_commands_parse(preset, part, tmp_path):
    todo = suite.entries(preset, part)
    assert len({e.name for e in todo}) == len(todo)
    # one 10-minute GPU call per part, with room for the install and the report
    assert sum(e.timeout_s for e in todo) <= 570
    for entry in todo:
        argv = [a.format(out=tmp_path) for a in entry.argv]
        if argv[0] == "bench.bench_sft":
            a = bench_sft.build_parser().parse_args(argv[1:])  # exits (fails the test) on a bad flag
            assert a.out == tmp_path and a.model in bench_sft.MODELS
        elif argv[0] == "pytest":
            assert (suite.Path(__file__).parents[1] / argv[1]).exists()
        else:
            assert argv[0] == "bench.kernels.collect"


def test_full_preset_covers_the_matrix():
    flags = [set(e.argv) for part in suite.PRESETS["full"].values() for e in part if e.argv[0] == "bench.bench_sft"]
    assert any("llama-1b" in f for f in flags)
    big = [f for f in flags if "llama-8b" in f]
    assert any("--no-packing" in f for f in big) and any("--qlora" in f for f in big)
    assert any("8192" in f for f in big) and any("--packing" in f and not f & {"8192", "--qlora"} for f in big)


def test_full_preset_runs_every_kernel_module_once_and_collects_each():
    modules = sorted(p.stem.removeprefix("test_") for p in (suite.Path(__file__).parents[1] / "bench" / "kernels")
                     .glob("test_*.py"))
    ran, collected = [], []
    for part in suite.PRESETS["full"].values():
        for e in part:
            if e.argv[0] == "pytest":
                ran.append(suite.Path(e.argv[1]).stem.removeprefix("test_"))
                assert "{out}/" + e.name + ".json" in e.argv  # its own JSON
            elif e.argv[0] == "bench.kernels.collect":
                collected += [a.split("/")[-1].removeprefix("kernels-").removesuffix(".json") for a in e.argv[1:]
                              if a.endswith(".json")]
                assert part.index(e) > max(part.index(x) for x in part if x.argv[0] == "pytest")
    assert sorted(ran) == modules and sorted(collected) == modules


def test_unknown_part_is_an_error():
    with pytest.raises(SystemExit, match="parts"):
        suite.entries("quick", 2)


def test_run_logs_and_enforces_the_cap(tmp_path):
    ok = suite.run(suite.Entry("ok", ("json.tool", "--help"), 60), tmp_path)
    assert ok["rc"] == 0 and "json.tool" in (tmp_path / "ok.log").read_text()
    slow = suite.Entry("slow", ("timeit", "-n", "1", "import time; time.sleep(30)"), 1)
    assert suite.run(slow, tmp_path)["rc"] == "timeout"
    bad = suite.run(suite.Entry("bad", ("json.tool", "/nonexistent/file"), 60), tmp_path)
    assert bad["rc"] not in (0, "timeout")


def test_a_capped_entry_is_stopped_with_its_children(tmp_path):
    """An entry's child processes (bench_sft runs each provider in one) stop with it at its cap."""
    (tmp_path / "spawner.py").write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")
    entry = suite.Entry("spawner", ("spawner",), 5, env={"PYTHONPATH": str(tmp_path)})
    assert suite.run(entry, tmp_path)["rc"] == "timeout"
    pid = int((tmp_path / "child.pid").read_text())
    import os
    import time

    for _ in range(50):  # reaped by init once killed; give it a moment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the entry's child {pid} is still running after the entry was stopped")


def test_main_records_each_entry_and_fails_on_a_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.PRESETS, "probe", {1: [suite.Entry("good", ("json.tool", "--help"), 60),
                                                     suite.Entry("broken", ("json.tool", "/nonexistent"), 60)]})
    assert suite.main(["--preset", "probe", "--out", str(tmp_path)]) == 1
    record = json.loads((tmp_path / "suite_probe.json").read_text())
    assert [r["entry"] for r in record] == ["good", "broken"] and record[0]["rc"] == 0 and record[1]["rc"] != 0
    assert (tmp_path / "RESULTS.md").exists()
    assert sys.executable


def test_fit_to_deadline_cuts_caps_and_keeps_the_collect_time():
    measure = suite.Entry("m", ("pytest", "x"), 300)
    collect = suite.Entry("kernels-collect", ("bench.kernels.collect", "a.json"), 15)
    assert suite.fit_to_deadline(measure, [collect], 1000) is measure
    reserve = suite.REPORT_S + suite.STOP_GRACE_S + 15
    assert suite.fit_to_deadline(measure, [collect], 200).timeout_s == 200 - reserve
    assert suite.fit_to_deadline(measure, [collect], reserve + suite.MIN_ENTRY_S - 1) is None
    # the collect itself keeps back only the report's time
    assert suite.fit_to_deadline(collect, [], suite.REPORT_S + 15) is collect


def test_time_limit_cuts_an_overrunning_part(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "STOP_GRACE_S", 1)
    monkeypatch.setattr(suite, "REPORT_S", 0)
    monkeypatch.setattr(suite, "MIN_ENTRY_S", 2)
    monkeypatch.setitem(suite.PRESETS, "probe", {1: [
        suite.Entry("slow", ("timeit", "-n", "1", "import time; time.sleep(30)"), 60),
        suite.Entry("after", ("json.tool", "--help"), 60)]})
    import time

    start = time.monotonic()
    assert suite.main(["--preset", "probe", "--out", str(tmp_path), "--time-limit", "5"]) == 1
    assert time.monotonic() - start < 20
    slow, after = json.loads((tmp_path / "suite_probe.json").read_text())
    assert slow["rc"] == "timeout" and slow["timeout_s"] <= 4
    assert after["rc"] == "not run"


def test_compare_flags_a_result_worse_than_its_namesake(tmp_path, monkeypatch, capsys):
    old_dir, out = tmp_path / "old", tmp_path / "out"
    old_dir.mkdir()
    env = {"card": "NVIDIA H200", "versions": {}, "commit": "abc"}
    write = ("import json, sys; json.dump({'environment': %r, 'rows': [{'provider': 'fastsft', 'tokens_per_s': %s}]},"
             " open(sys.argv[1] + '/sft_x.json', 'w'))")
    (old_dir / "sft_x.json").write_text(json.dumps({"environment": env, "rows": [{"provider": "fastsft",
                                                                                   "tokens_per_s": 1000.0}]}))
    (tmp_path / "writer.py").write_text(write % (env, "800.0"))
    monkeypatch.setitem(suite.PRESETS, "probe", {1: [suite.Entry("w", ("writer", "{out}"), 60,
                                                                 env={"PYTHONPATH": str(tmp_path)})]})
    assert suite.main(["--preset", "probe", "--out", str(out)]) == 0
    assert suite.main(["--preset", "probe", "--out", str(out), "--compare", str(old_dir)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert suite.main(["--preset", "probe", "--out", str(out), "--compare", str(old_dir), "--threshold", "0.5"]) == 0


@pytest.mark.parametrize("flags", [["--time-limit", "0"], ["--compare", "/nonexistent/folder"]])
def test_bad_flags_are_rejected_before_the_run(tmp_path, flags, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--preset", "quick", "--out", str(tmp_path), *flags])
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "suite_quick.json").exists()  # nothing ran
