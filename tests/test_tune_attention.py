"""The attention tuner's scoring: a configuration wins its table key on the time summed over the key's cases, and
one that failed in any of them does not count."""

from bench import tune_attention as tune
from fastsft.triton_kernels import flash_attention as fa


def _row(kernel, kind, tokens, bucket, cfg, ms=None):
    row = {"kernel": kernel, "head_dim": 128, "kind": kind, "tokens": tokens, "bucket": bucket,
           **dict(zip(tune.CONFIG_KEYS, cfg))}
    if ms is None:
        row["error"] = "out of resources"
    else:
        row["ms"] = ms
    return row


def test_best_config_is_fastest_summed_over_the_cases_of_its_row_kind():
    a, b, c = (64, 64, 4, 3, False), (64, 32, 4, 3, True), (128, 64, 8, 3, False)
    rows = [
        # packed ("short"): b is faster at 8k but slower in sum; c is fastest at 8k but failed at 16k
        _row("fwd", "packed", 8192, "short", a, 1.0), _row("fwd", "packed", 16384, "short", a, 2.0),
        _row("fwd", "packed", 8192, "short", b, 0.9), _row("fwd", "packed", 16384, "short", b, 2.3),
        _row("fwd", "packed", 8192, "short", c, 0.5), _row("fwd", "packed", 16384, "short", c),
        # dense ("long"): one case
        _row("fwd", "dense", 8192, "long", a, 5.0), _row("fwd", "dense", 8192, "long", b, 4.0),
    ]
    best = tune.best_by_key(rows, 2, fa)
    assert best["fwd/d128/16bit/short"] == (dict(zip(tune.CONFIG_KEYS, a)), 3.0)
    assert best["fwd/d128/16bit/long"] == (dict(zip(tune.CONFIG_KEYS, b)), 4.0)
    summed = tune.summed_times(rows, 2, fa)
    assert ("fwd/d128/16bit/short", c) not in summed
    assert summed[("fwd/d128/16bit/short", b)] == 0.9 + 2.3


def test_every_candidate_has_the_five_config_fields():
    for kernel, candidates in tune.CANDIDATES.items():
        assert kernel in ("fwd", "dkdv", "dq")
        assert len(set(candidates)) == len(candidates), f"{kernel}: a candidate is listed twice"
        for cand in candidates:
            assert len(cand) == len(tune.CONFIG_KEYS) == 5
            assert all(type(x) is int and x > 0 for x in cand[:4]) and type(cand[4]) is bool
        assert any(c[4] for c in candidates) and not all(c[4] for c in candidates)


def test_rows_without_a_tma_field_count_as_pointer_configs():
    old = {"kernel": "dq", "head_dim": 128, "kind": "dense", "tokens": 8192, "bucket": "long", "ms": 1.0,
           "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    assert tune.summed_times([old], 2, fa) == {("dq/d128/16bit/long", (128, 64, 8, 3, False)): 1.0}
