"""bench.buckets' harness on the CPU (--tiny, eager): every bucket warms up and is timed, and a policy the compiler
refuses becomes a failed row instead of ending the call."""

from __future__ import annotations

import argparse

import pytest

from ldmlab.bench import buckets


@pytest.mark.usefixtures("one_thread")
def test_tiny_policies_time_every_bucket_and_report_against_the_static_square() -> None:
    sizes = [(h // 4, w // 4) for h, w in buckets.parse_sizes(buckets.BUCKETS)]
    results = [buckets.run_policy(p, sizes, batch=1, steps=5, tiny=True) for p in ("static_square", "static")]
    square, static = results
    assert list(square["warmup"]) == [sizes[0]] and list(static["warmup"]) == sizes  # the square alone, then all
    assert all(r["mixed_mpx_s"] > 0 and r["square_mpx_s"] > 0 for r in results)
    results.append({"policy": "dynamic", "error": "InductorError: cannot determine truth value of Relational"})
    args = argparse.Namespace(policies="static_square,static,dynamic", batch=1, steps=5)
    table = buckets.report(results, args)
    ratio = static["mixed_mpx_s"] / square["square_mpx_s"]
    assert "| static | 0 |" in table and f"| {ratio:.3f} |" in table
    assert "| dynamic | failed: InductorError: cannot determine truth value of Relational |" in table
