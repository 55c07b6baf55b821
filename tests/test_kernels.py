"""Chunk planning and the multi-average kernel against plain per-tensor arithmetic."""

import pytest
import torch

from emakit import kernels


@pytest.mark.parametrize("numels,chunk", [([3, 5], 4), ([1, 100, 7, 0, 33], 16), ([10] * 9, 10), ([64], 1)])
def test_plan_covers_every_element_once_within_the_chunk(numels, chunk):
    batches = kernels.plan_pieces(numels, chunk)
    seen = [torch.zeros(n, dtype=torch.int64) for n in numels]
    for batch in batches:
        assert 0 < sum(p.numel for p in batch) <= chunk
        for p in batch:
            seen[p.index][p.start : p.start + p.numel] += 1
            assert p.whole == (p.numel == numels[p.index] <= chunk)
    assert all(bool((s == 1).all()) for s in seen)


def test_plan_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk"):
        kernels.plan_pieces([3], 0)


def test_is_dense_and_flat_view():
    x = torch.randn(2, 3, 4, 5)
    cl = x.to(memory_format=torch.channels_last)
    assert kernels.is_dense(x) and kernels.is_dense(cl)
    assert not kernels.is_dense(x[:, :, ::2])
    assert not kernels.is_dense(torch.randn(3, 1).expand(3, 4))
    flat = kernels.flat_view(cl)
    assert flat.data_ptr() == cl.data_ptr() and flat.numel() == cl.numel()
    torch.testing.assert_close(flat.sort().values, x.flatten().sort().values)
    with pytest.raises(ValueError, match="dense"):
        kernels.flat_view(x[:, :, ::2])


@pytest.mark.parametrize("staged", [False, True])
def test_multi_lerp_matches_per_tensor_lerp(staged):
    shapes = [torch.Size([7, 3]), torch.Size([40]), torch.Size([2, 2])]
    src_dtype = torch.bfloat16 if staged else torch.float32
    sources = [torch.randn(s).to(src_dtype) for s in shapes]
    averages = [[torch.randn(s) for s in shapes] for _ in range(2)]
    expected = [
        [a.double() + w * (s.double() - a.double()) for a, s in zip(avgs, sources)]
        for avgs, w in zip(averages, [0.25, 0.5])
    ]
    batches = kernels.plan_pieces([s.numel() for s in shapes], chunk=16)

    def cut(tensors):
        return [
            [tensors[p.index] if p.whole else tensors[p.index].view(-1)[p.start : p.start + p.numel] for p in b]
            for b in batches
        ]

    scratch = None
    if staged:
        buf = torch.empty(16)
        scratch = []
        for b in batches:
            row, off = [], 0
            for p in b:
                v = buf[off : off + p.numel]
                row.append(v.view(shapes[p.index]) if p.whole else v)
                off += p.numel
            scratch.append(row)
    kernels.multi_lerp_([cut(a) for a in averages], sources, batches, [0.25, 0.5], scratch)
    for avgs, exp in zip(averages, expected):
        for a, e in zip(avgs, exp):
            torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-6)


def test_lerp_weight_one_copies_exactly_and_zero_leaves_alone():
    a, b = [torch.randn(5)], [torch.randn(5) * 1e30]
    kernels.lerp_(a, b, 1.0)
    assert torch.equal(a[0], b[0])
    before = a[0].clone()
    kernels.lerp_(a, [torch.zeros(5)], 0.0)
    assert torch.equal(a[0], before)


def test_joined_spans_cover_the_same_elements_in_fewer_views():
    from emakit._engine.storage import joined

    buffer = torch.arange(100.0)
    other = torch.arange(10.0)
    pieces = [buffer[0:10].view(2, 5), buffer[10:30], buffer[30:30], buffer[40:50], other, buffer[50:60], buffer[60:80:2]]
    spans = joined(pieces)
    # 0:30 back to back (the empty piece skipped), 40:50 after a gap, another storage, 50:60 after it, strided alone
    assert [(s.storage_offset(), s.numel()) for s in spans] == [(0, 30), (40, 10), (0, 10), (50, 10), (60, 10)]
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in spans]), torch.cat([p.reshape(-1) for p in pieces]))
    assert spans[0].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # views, not copies
