"""The resumable batch plan against torch's own DistributedSampler + BatchSampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from medcap.training import ResumableBatchSampler


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,world,batch,drop_last", [(10, 2, 2, True), (11, 2, 2, True), (13, 3, 2, False), (7, 1, 3, False)])
def test_matches_distributed_sampler(n, world, batch, drop_last):
    for epoch in (0, 1):
        for rank in range(world):
            ref_sampler = DistributedSampler(_Sized(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            ref_sampler.set_epoch(epoch)
            ref = list(BatchSampler(ref_sampler, batch, drop_last=drop_last))
            ours = ResumableBatchSampler(n, batch, num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
            ours.set_epoch(epoch)
            assert list(ours) == ref
            assert len(ours) == len(ref)


def test_one_process_with_the_global_batch_sees_the_ranks_union():
    ranks = [ResumableBatchSampler(16, 2, num_replicas=2, rank=r, seed=1) for r in range(2)]
    single = ResumableBatchSampler(16, 4, seed=1)
    for s in ranks + [single]:
        s.set_epoch(3)
    for b0, b1, b in zip(*(list(s) for s in ranks), list(single)):
        assert sorted(b0 + b1) == sorted(b)


def test_resume_skips_exactly_the_consumed_batches():
    s = ResumableBatchSampler(20, 3, seed=2)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_batch=4)
    assert list(s) == full[4:]
    assert len(s) == len(full) - 4


def test_group_by_length_batches_similar_lengths_in_random_order():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (400,), generator=g).tolist()
    s = ResumableBatchSampler(400, 4, num_replicas=2, rank=0, seed=3, lengths=lengths, group_by_length=True, group_size=10)
    s1 = ResumableBatchSampler(400, 4, num_replicas=2, rank=1, seed=3, lengths=lengths, group_by_length=True, group_size=10)
    plain = ResumableBatchSampler(400, 4, num_replicas=2, rank=0, seed=3)
    gb = s.global_batches()
    # every sample exactly once per epoch
    assert sorted(i for b in gb for i in b) == list(range(400))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(gb) < 0.2 * padding(plain.global_batches())
    # batch order is not sorted by length (random), and differs between epochs
    maxima = [max(lengths[i] for i in b) for b in gb]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    s.set_epoch(1)
    assert s.global_batches() != gb
    # ranks split each global batch; resumable like the plain plan
    s.set_epoch(0)
    s1.set_epoch(0)
    for b0, b1, g_ in zip(list(s), list(s1), gb):
        assert sorted(b0 + b1) == sorted(g_)
    s.set_epoch(0, start_batch=5)
    assert list(s) == [b[0::2] for b in gb[5:]]


def test_resume_check_refuses_a_different_plan():
    s = ResumableBatchSampler(20, 2, seed=2)
    state = s.state_dict()
    ResumableBatchSampler(20, 2, seed=2).check_resumable(state)
    ResumableBatchSampler(20, 1, num_replicas=2, rank=1, seed=2).check_resumable(state)  # same global batch
    with pytest.raises(ValueError, match="seed"):
        ResumableBatchSampler(20, 2, seed=3).check_resumable(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableBatchSampler(20, 4, seed=2).check_resumable(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        ResumableBatchSampler(0, 2)
    with pytest.raises(ValueError, match="lengths"):
        ResumableBatchSampler(5, 2, group_by_length=True)
