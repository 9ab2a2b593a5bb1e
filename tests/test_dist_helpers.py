"""The spawned-gloo harness the parallel tests stand on: results come back, failures and hangs are reported,
and scenarios sharing the session's spawn fail alone."""

import pytest
import torch
import torch.distributed as dist

from dist_helpers import RankFailed, run_ranks, share_ranks, shared_results


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _rank_one_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


share_ranks(2, "helpers_sum", _sum_ranks)
share_ranks(2, "helpers_raises", _rank_one_raises)


def test_every_rank_returns_the_all_reduced_value():
    assert shared_results(2, "helpers_sum") == [3.0, 3.0]  # in the session's one spawn of 2 ranks


def test_a_shared_scenario_that_raises_fails_only_the_tests_that_read_it():
    with pytest.raises(RankFailed, match="rank 1 raised in scenario 'helpers_raises':(.|\n)*boom on rank one"):
        shared_results(2, "helpers_raises")
    assert shared_results(2, "helpers_sum") == [3.0, 3.0]


def test_a_rank_that_raises_is_reported_with_its_traceback():
    with pytest.raises(RankFailed, match="rank 1 raised:(.|\n)*boom on rank one"):
        run_ranks(_rank_one_raises, 2)
