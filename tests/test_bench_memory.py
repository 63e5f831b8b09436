"""bench.memory_breakdown's replay of the allocator's trace and its categories, on hand-made traces."""

from __future__ import annotations

from bench import memory_breakdown as mb


def frames(*files, name="f"):
    return [{"filename": f, "name": name, "line": 1} for f in files]


def test_the_peak_is_the_highest_allocated_total_and_its_live_blocks():
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": []},
        {"action": "alloc", "addr": 2, "size": 50, "frames": []},
        {"action": "free_requested", "addr": 1, "size": 100},  # still pending: counted
        {"action": "alloc", "addr": 3, "size": 10, "frames": []},  # 160: the peak
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 40, "frames": []},  # 100
    ]
    peak, blocks = mb.peak_blocks(events)
    assert peak == 160 and set(blocks) == {1, 2, 3}


def test_categories_by_address_then_by_frame():
    known = {7: "weights"}
    assert mb.categorize(frames("/x/fastsft/captured_layers.py"), 7, known) == "weights"
    assert mb.categorize(frames("/x/site-packages/fastsft/captured_layers.py"), 8, known) == "captured layers"
    assert mb.categorize(frames("/x/fastsft/ops/linear_cross_entropy.py"), 8, known) == "loss"
    recompute = [*frames("/x/modeling_llama.py"), {"filename": "/t/torch/utils/checkpoint.py", "name": "recompute_fn"}]
    assert mb.categorize(recompute, 8, known) == "recomputed layer"
    forward = [*frames("/x/modeling_llama.py"), {"filename": "/t/torch/utils/checkpoint.py", "name": "checkpoint"}]
    assert mb.categorize(forward, 8, known) == "checkpointed layer inputs"
    assert mb.categorize([], 8, known) == "autograd (gradients, backward temporaries)"
    assert mb.categorize(frames("/x/y/optimizer.py"), 8, known) == "other (optimizer.py)"


def test_breakdown_sums_categories_and_the_graph_pools():
    snapshot = {"device_traces": [[
        {"action": "alloc", "addr": 1, "size": 3 << 30, "frames": []},
        {"action": "alloc", "addr": 2, "size": 1 << 30, "frames": frames("/a/fastsft/captured_layers.py")},
    ]], "segments": [{"device": 0, "total_size": 2 << 30, "segment_pool_id": (1, 2)},
                     {"device": 0, "total_size": 5 << 30, "segment_pool_id": (0, 0)}]}
    got = mb.breakdown(snapshot, {1: "weights"})
    assert got["peak_GiB"] == 4 and got["graph_pools_GiB"] == 2
    assert got["categories_GiB"] == {"weights": 3.0, "captured layers": 1.0}
    table = mb.category_table([{"provider": "fastsft", **got}])
    assert "| weights | 3.000 |" in table and "| graph pools (reserved) | 2.000 |" in table


def test_the_replay_starts_from_the_blocks_live_when_the_recording_began():
    snapshot = {"segments": [{"device": 0, "address": 1000, "total_size": 300, "blocks": [
        {"size": 100, "state": "active_allocated"}, {"size": 50, "state": "inactive"},
        {"size": 150, "state": "active_allocated"}]}]}
    start = mb.live_blocks(snapshot)
    assert {addr: size for addr, (size, _) in start.items()} == {1000: 100, 1150: 150}
    events = [{"action": "free_completed", "addr": 1150, "size": 150},
              {"action": "alloc", "addr": 5, "size": 100, "frames": []}]
    peak, blocks = mb.peak_blocks(events, start)
    assert peak == 250 and set(blocks) == {1000, 1150}  # the start was the highest point
    assert mb.categorize(blocks[1000][1], 1000, {1000: "weights"}) == "weights"
    assert mb.categorize(blocks[1150][1], 1150, {}) == "before training"
