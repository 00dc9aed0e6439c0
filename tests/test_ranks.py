"""Many ranks without many machines: at 8 and 256 ranks the batch splits into disjoint micro-batches
that cover it (with B_rec and B_ssl), tar shards into disjoint streams that cover them, 8 gloo
processes agree on the memory probe's k, and at 256 ranks (PyTorch's fake process group: every
collective returns at once, moving nothing) one stage-1 step issues the collectives, with the
bytes, that the model written here predicts."""
import itertools
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import vtp


@pytest.mark.parametrize('world', [8, 256])
@pytest.mark.parametrize('k', [1, 4])
def test_micro_batches_partition_the_batch(world, k):
    B, ssl, rec = 16384, 4096, 2048  # the paper's batch, B_ssl = B / 4, B_rec = B / 8
    per_step = {}
    for rank in range(world):
        b = data.MicroBatchBuilder(None, 32, 32, 16, 2, B, ssl, rec, world, rank, k, 0, 0.5,
                                   (0.1, 0.5), 8)
        assert b.b == vtp.split_batch(B, world, k, {'ssl': ssl, 'rec': rec})
        for micro in range(2 * k):  # two steps
            step, m, pos, n_rec, is_ssl = b.positions(micro)
            assert (step, m) == divmod(micro, k) and len(pos) == B // (world * k)
            got = per_step.setdefault(step, [[], 0, 0])
            got[0] += pos.tolist()
            got[1] += n_rec
            got[2] += int(is_ssl.sum())
            # B_rec and B_ssl are every (B / B_sub)-th sample, the B_rec rows first
            assert (pos[:n_rec] % (B // rec) == 0).all() and (pos[n_rec:] % (B // rec) != 0).all()
            assert (is_ssl == (pos % (B // ssl) == 0)).all()
    for step, (pos, n_rec, n_ssl) in per_step.items():
        assert sorted(pos) == list(range(step * B, (step + 1) * B))  # each sample once
        assert (n_rec, n_ssl) == (rec, ssl)


class Shards:  # a stand-in tar dataset: one group and one sample per shard, its name
    def __init__(self, n):
        self.shards = [f'shard{i:04d}' for i in range(n)]

    def groups(self, shard_iter, counts):
        yield from shard_iter

    def samples(self, _, counts, groups):
        yield from groups


class Builder:  # a stand-in micro-batch builder: a micro-batch of one sample, as it is
    seed, rows = 0, 1

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def build(self, k, samples, counts):
        return samples[0]


@pytest.mark.parametrize('world,workers,n_shards', [(8, 2, 37), (256, 1, 300)])
def test_tar_shards_partition_over_ranks_and_workers(world, workers, n_shards, monkeypatch):
    monkeypatch.setattr(data, 'get_worker_info', lambda: worker)
    passes = [[], []]
    for rank, w in itertools.product(range(world), range(workers)):
        worker = type('Info', (), {'id': w})
        slot, slots = rank * workers + w, world * workers
        n = len(range(slot, n_shards, slots))  # this slot's shards in one pass
        stream = iter(data.StreamMicroBatches(Shards(n_shards), Builder(rank, world), 0, 0,
                                              workers, shuffle_buffer=1))
        got = [next(stream) for _ in range(2 * n)]
        passes[0] += got[:n]
        passes[1] += got[n:]
    for p in passes:  # every pass reads each shard exactly once, over all ranks and workers
        assert sorted(p) == Shards(n_shards).shards
    assert passes[0] != passes[1]  # and each pass in another order


def agree(rank, world, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    out[rank, 'fits'] = vtp.agree_grad_accum([1, 2, 1, 4, 1, 1, 2, 1][rank])  # the largest k
    try:
        vtp.agree_grad_accum([1, 2, 1, 0, 1, 1, 2, 1][rank])  # rank 3 fits nothing
    except SystemExit as e:  # every rank stops with one line, the process group closed
        out[rank, 'none'] = str(e) if not dist.is_initialized() else 'still initialised'


def test_eight_gloo_ranks_agree_on_the_probe():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(agree, (8, port, out), nprocs=8)
    assert [out[r, 'fits'] for r in range(8)] == [4] * 8
    assert all(out[r, 'none'].startswith('error: even the smallest') for r in range(8)), out


def test_collectives_of_a_step_at_256_ranks(monkeypatch):
    """CLIP's gathers, Sinkhorn-Knopp's reductions and DDP's gradient buckets at 256 ranks,
    counted and sized against a model: per CLIP loss 2 all_gathers of (b, W) in and, in backward,
    2 all_reduces of (world b, W); per Sinkhorn-Knopp call 3 + n_iters all_reduces (the max, the
    count, the total, a (K, 1) row sum per iteration); DDP all-reduces every gradient once."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    world = 256
    dist.init_process_group('fake', store=FakeStore(), rank=3, world_size=world)
    calls = []
    for name in ('all_gather', 'all_reduce'):
        def counted(*a, _name=name, _f=getattr(dist, name), **kw):
            t = a[1] if _name == 'all_gather' else a[0]
            calls.append((_name, t.numel() * t.element_size()))
            return _f(*a, **kw)
        monkeypatch.setattr(dist, name, counted)
    try:
        torch.manual_seed(0)
        # CLIP only, the parameters it does not use frozen (DDP all-reduces a bucket once all of
        # its gradients are in, and the buckets in order)
        cfg = replace(vtp.VTP_CONFIGS['tiny'], train_reconstruction=False, train_ssl=False)
        model = vtp.VTP(cfg)
        b = 4
        tokens = torch.randint(0, cfg.text_vocab_size, (b, cfg.text_context_length))
        images = torch.randn(b, 3, 32, 32)
        sum(v.sum() for v in model(images=images, tokens=tokens).values()).backward()
        for p in model.parameters():
            p.requires_grad_(p.grad is not None)
            p.grad = None
        net = vtp.ddp(model, torch.device('cpu'))  # the stage scripts' options
        # gradients into the buckets, and the constant RoPE tables not broadcast every forward
        assert net.gradient_as_bucket_view and list(model.buffers())
        assert not net.will_sync_module_buffers()
        buckets = []

        def hook(state, bucket):  # DDP's buckets: what its reducer all-reduces
            buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        net.register_comm_hook(None, hook)
        calls.clear()
        out = net(images=images, tokens=tokens)
        loss = vtp.clip_loss(out['image_features'], out['text_features'], out['logit_scale'])
        n_clip_fwd = len(calls)
        K = 64
        vtp.sinkhorn_knopp(torch.randn(2 * b, K), 0.04)
        n_sk = len(calls) - n_clip_fwd
        loss.backward()
        W = out['image_features'].shape[1]
        feat = b * W * 4  # fp32 features of one rank
        assert calls[:n_clip_fwd] == [('all_gather', feat)] * 2
        assert [c[0] for c in calls[n_clip_fwd:n_clip_fwd + n_sk]] == ['all_reduce'] * (3 + 3)
        assert sorted(calls[n_clip_fwd + n_sk:]) == [('all_reduce', world * feat)] * 2
        trained = [p for p in model.parameters() if p.requires_grad]
        assert sum(buckets) == sum(p.numel() * 4 for p in trained) and len(trained) > 50
    finally:
        dist.destroy_process_group()
