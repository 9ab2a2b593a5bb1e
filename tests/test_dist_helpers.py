"""The spawned-gloo harness the parallel tests stand on: results come back, failures and hangs are reported."""

import pytest
import torch
import torch.distributed as dist

from dist_helpers import RankFailed, run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _rank_one_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_every_rank_returns_the_all_reduced_value():
    assert run_ranks(_sum_ranks, 2) == [3.0, 3.0]


def test_a_rank_that_raises_is_reported_with_its_traceback():
    with pytest.raises(RankFailed, match="rank 1 raised:(.|\n)*boom on rank one"):
        run_ranks(_rank_one_raises, 2)
