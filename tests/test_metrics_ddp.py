"""1 process against 2 gloo ranks with uneven shares (7 + 12 generated images, 10 + 15 reference images): the
all-reduced statistics, the gathered features and every metric equal the single-process ones."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_metrics import StandIn, images
    from ldmlab.metrics import (ClipScore, FeatureStatistics, MetricOptions, SampleMetrics, all_gather_rows,
                                all_reduce_sum, reference_statistics)

    out, world = sys.argv[1], int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    share = lambda x, cuts: x[cuts[rank]:cuts[rank + 1]] if world > 1 else x
    fake, real = share(images(19, 1), [0, 7, 19]), share(images(25, 0), [0, 10, 25])
    features = share(torch.randn(19, 6, generator=torch.Generator().manual_seed(3)), [0, 7, 19])

    stats = FeatureStatistics(6, "stand-in", 8, "test")
    for batch in features.split(3):  # uneven batches too: 3, 3, 1 on rank 0
        stats.update(batch)
    reduced = stats.all_reduce()
    net = StandIn()
    ref, ref_feats = reference_statistics(net, real.split(1), source="test-real")
    sm = SampleMetrics(net, ref, ref_feats, resolution=8,
                       options=MetricOptions(kid_subsets=4, kid_subset_size=9, is_splits=2))
    for batch in fake.split(1):  # one image per call: the float32 network rounds alike in both runs
        sm.update(batch)
    clip = ClipScore()
    clip.update(features[:, :3], features[:, 3:])
    torch.save({"count": reduced.count, "sum": reduced.sum, "outer": reduced.outer, "mean": reduced.mean,
                "cov": reduced.covariance, "local_count": stats.count, "gathered": all_gather_rows(features),
                "ref_count": ref.count, "ref_resolution": ref.resolution, "ref_feats": ref_feats,
                "metrics": sm.compute(), "clip": clip.compute(), "twice": stats.all_reduce().count,
                "sum_of_ranks": all_reduce_sum(torch.tensor([rank + 1.0]))},
               f"{out}/{'single' if world == 1 else f'rank{rank}'}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_equals_two_gloo_ranks(tmp_path: Path) -> None:
    (tmp_path / "ddp_metrics.py").write_text(SCRIPT)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    envs = [{**base, "WORLD_SIZE": "1"}] + [{**base, "WORLD_SIZE": "2", "RANK": str(r)} for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "ddp_metrics.py"), str(tmp_path), str(TESTS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    single, *ranks = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("single", "rank0", "rank1"))
    assert [r["local_count"] for r in ranks] == [7, 12]
    for r in ranks:
        assert r["count"] == r["twice"] == single["count"] == 19  # all_reduce returns a copy: no double count
        for key in ("sum", "outer", "mean", "cov"):  # float64 sums: only the order of additions differs
            torch.testing.assert_close(r[key], single[key], rtol=1e-12, atol=1e-12)
        assert torch.equal(r["gathered"], single["gathered"])  # rank 0's rows first, then rank 1's
        assert (r["ref_count"], r["ref_resolution"]) == (25, 8) and torch.equal(r["ref_feats"], single["ref_feats"])
        assert r["sum_of_ranks"].item() == 3.0
        assert r["clip"] == single["clip"] or abs(r["clip"] - single["clip"]) < 1e-12
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank gets the same dict
    m, s = ranks[0]["metrics"], single["metrics"]
    assert set(m) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    for key in m:  # the gathered rows are identical; only FD's sums were added in another order
        assert abs(m[key] - s[key]) <= 1e-9 * max(1.0, abs(s[key])), (key, m[key], s[key])
