"""Models and losses of vtp.py: attention, RoPE, official parity, checkpoint loading, each loss
against a direct computation, and the distributed losses over 2 gloo ranks against one process."""
import json
import math
from types import SimpleNamespace
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vtp

GOLDEN = Path(__file__).resolve().parent / 'golden' / 'vtp_tiny.pt'


def small_config(**kw):
    return replace(vtp.VTP_CONFIGS['tiny'], patch_size=16, bottleneck_dim=32, embed_dim=64, depth=2,
                   num_heads=2, decoder_embed_dim=64,
                   decoder_depth=1, decoder_num_heads=2, text_embed_dim=32, text_depth=1,
                   text_num_heads=2,
                   text_context_length=8, dino_out_dim=32, dino_hidden_dim=32,
                   dino_bottleneck_dim=16, **kw)


def test_attention_equals_naive_softmax():
    torch.manual_seed(0)
    attn = vtp.Attention(32, 4, qk_norm=True)
    x = torch.randn(2, 7, 32)
    out = attn(x)
    qkv = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_text_block_is_openclips_causal_block():
    torch.manual_seed(0)
    blk = vtp.TextBlock(16, 2)
    torch.nn.init.normal_(blk.attn.in_proj_weight, std=0.3)
    x = torch.randn(3, 5, 16)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)  # the official module, same weights
    mha.load_state_dict(blk.attn.state_dict())
    mask = torch.full((5, 5), float('-inf')).triu(1)
    h = blk.ln_1(x)
    h = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(blk(x), h + blk.mlp(blk.ln_2(h)), atol=1e-5, rtol=1e-5)


def test_rope_preserves_norm_and_depends_on_offsets_only():
    rope = vtp.DinoRope(16)
    sin, cos = rope(4, 4)
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    # the same q (k) at every position of a 4x4 grid, plus one unrotated cls token in front
    qs = vtp.rope_rotate(q.expand(1, 1, 17, 16).float(), sin, cos)[0, 0]
    ks = vtp.rope_rotate(k.expand(1, 1, 17, 16).float(), sin, cos)[0, 0]
    q_bf = q.bfloat16().float()  # the rotation runs in bf16, as the official code does
    assert torch.equal(qs[0], q_bf)  # cls is not rotated
    torch.testing.assert_close(qs.norm(dim=-1), q_bf.norm().expand(17), rtol=2e-2, atol=0)
    dots = qs[1:] @ ks[1:].t()  # (16, 16) over grid positions
    # position (y, x) = divmod(i, 4): pairs with the same offset give the same score
    pairs = {}
    for i in range(16):
        for j in range(16):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            pairs.setdefault((yi - yj, xi - xj), []).append(dots[i, j])
    spread = max((max(v) - min(v)).abs().item() for v in pairs.values())
    values = torch.stack([torch.stack(v).mean() for v in pairs.values()])
    assert spread < 0.05 * values.abs().max().item()
    assert values.std() > 0.1  # and the score does depend on the offset


def test_rope_periods_match_official_table():
    periods = vtp.DinoRope(64).periods
    ref = [1.0, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5, 10.0, 13.3125, 17.75,
           23.75,
           31.625, 42.25, 56.25, 75.0]  # the official VTP RoPE periods
    assert periods.dtype == torch.bfloat16 and periods.float().tolist() == ref


def test_official_parity():
    g = torch.load(GOLDEN, weights_only=True)
    model = vtp.VTP.from_official(g['state_dict'], g['config']).eval()
    img, txt, o = g['inputs']['image'], g['inputs']['text'], g['outputs']

    def check(ours, ref):
        assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())

    with torch.no_grad():
        check(model.encode(img), o['latents'])
        check(model.decode(o['latents']), o['decoded'])
        feats = model.features(img)  # official get_last_layer_feature
        check(feats[:, 0], o['cls_token'])
        check(feats[:, 1:], o['patch_tokens'])
        for i, (p, c) in enumerate(model.intermediate_layers(img, 2, return_class_token=True)):
            check(p, o['intermediate_patch'][i])
            check(c, o['intermediate_cls'][i])
        check(model.image_features(img), o['clip_image'])
        check(model.text_features(txt), o['clip_text'])


def write_safetensors(path, tensors):
    """A minimal safetensors writer (format: header size, JSON header, raw little-endian bytes)."""
    names = {torch.float32: 'F32', torch.bfloat16: 'BF16', torch.int64: 'I64'}
    header, blobs, offset = {}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {'dtype': names[t.dtype], 'shape': list(t.shape),
                     'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(len(h).to_bytes(8, 'little') + h + b''.join(blobs))


def test_from_official_hf_folder_and_legacy_keys(tmp_path):
    g = torch.load(GOLDEN, weights_only=True)
    write_safetensors(tmp_path / 'model.safetensors', g['state_dict'])
    (tmp_path / 'config.json').write_text(json.dumps(g['config']))
    model = vtp.VTP.from_official(str(tmp_path)).eval()
    assert model.config.text_num_heads == 4  # only config.json can tell the text head count
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(g['inputs']['text']),
                                   g['outputs']['clip_text'])
        torch.testing.assert_close(model.encode(g['inputs']['image']), g['outputs']['latents'])

    # the legacy meta-arch names, with its training-only parts, load through the same mapping
    def legacy_name(k):
        if k.startswith('visual_proj.'):
            return 'proj.' + k[len('visual_proj.'):]
        if k.startswith('text_transformer.'):
            return 'transformer.' + k[len('text_transformer.'):]
        return k

    legacy = {legacy_name(k): v for k, v in g['state_dict'].items()}
    legacy['teacher_proj.weight'] = torch.zeros(3)
    legacy['dino_head.mlp.0.weight'] = torch.zeros(3)
    m2 = vtp.VTP.from_official(legacy, g['config']).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2.encode(g['inputs']['image']), g['outputs']['latents'])
    # load_tokenizer takes the folder as well
    assert isinstance(vtp.load_tokenizer(str(tmp_path)), vtp.VTP)


def test_our_checkpoint_roundtrip_and_wrong_kind(tmp_path):
    from dataclasses import asdict
    torch.manual_seed(0)
    m = vtp.VTP(small_config()).eval()
    torch.save({'model': m.state_dict(), 'config': asdict(m.config), 'step': 3},
               tmp_path / 'ckpt.pt')
    m2 = vtp.load_tokenizer(str(tmp_path / 'ckpt.pt'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.encode(x), m2.encode(x))
    torch.save({'model': {'pos_embed': torch.zeros(1)}, 'step': 1}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a VTP'):
        vtp.load_tokenizer(str(tmp_path / 'other.pt'))


def test_shapes_and_bottleneck_api():
    torch.manual_seed(0)
    m = vtp.VTP(small_config()).eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        z = m.encode(x)
        assert z.shape == (2, 32, 3, 2)
        assert m.decode(z).shape == (2, 3, 48, 32)
        f = m.features(x, bottleneck=True)
        # the bottleneck is one bias-free Linear on the final-normed tokens
        torch.testing.assert_close(f[:, 1:].transpose(1, 2).reshape(2, 32, 3, 2), z)
        torch.testing.assert_close(f, m.trunk.feature_bottleneck(m.features(x)))


def test_gradients_keep_the_parameters_layout():
    """Every gradient of a training forward has its parameter's strides (the layout DDP's
    gradient buckets alias; a mismatch costs a copy and a warning every step): the decoder's 1x1
    convs read transposed token views, so their weights are channels-last."""
    torch.manual_seed(0)
    m = vtp.VTP(small_config())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # at these shapes one thread takes a kernel that follows the weight
    bad = []  # the gradients as autograd hands them over (to DDP's hooks), before .grad
    for n, p in m.named_parameters():
        p.register_hook(lambda g, n=n, p=p: bad.append(n) if g.stride() != p.stride() else None)
    out = m(images=torch.randn(2, 3, 32, 32), tokens=torch.randint(1, 50, (2, 8)), n_rec=2)
    sum(v.float().sum() for v in out.values()).backward()
    torch.set_num_threads(threads)
    assert not bad, bad


def test_clip_loss_equals_direct_computation():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    s = torch.tensor(10.0)
    logits = s * img @ txt.t()
    ref = 0
    for i in range(6):  # -log softmax of the matching pair, both directions
        ref += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    torch.testing.assert_close(vtp.clip_loss(img, txt, s), ref / 12)


def test_clip_accumulation_is_exact_at_linear_cost():
    """k micro-steps over the cache (vtp.clip_cache) give the loss and every gradient (features,
    logit scale) of the whole batch at once, in float64 to rounding; their logits cost a few times
    the one-pass loss, not k times (scoring all of a rank's rows in every micro-step: k x)."""
    torch.manual_seed(0)
    k, b, W = 8, 4, 16
    img, txt = (F.normalize(torch.randn(k * b, W, dtype=torch.float64), dim=-1) for _ in 'it')
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    leaves = lambda: (img.clone().requires_grad_(), txt.clone().requires_grad_())
    i1, t1 = leaves()
    with FlopCounterMode(display=False) as one:
        loss = vtp.clip_loss(i1, t1, scale.exp())
        loss.backward()
    ref = (i1.grad, t1.grad, scale.grad.clone())
    scale.grad, (i2, t2), total = None, leaves(), 0
    with FlopCounterMode(display=False) as acc:
        cache = vtp.clip_cache(img.view(k, b, W), txt.view(k, b, W), scale.exp())
        for m in range(k):
            share = vtp.clip_loss(i2[m * b:(m + 1) * b], t2[m * b:(m + 1) * b], scale.exp(),
                                  cache, m)
            (share / k).backward()
            total = total + share.detach() / k
    torch.testing.assert_close(total, loss.detach(), rtol=1e-12, atol=0)
    for got, want in zip((i2.grad, t2.grad, scale.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert acc.get_total_flops() < 4 * one.get_total_flops(), \
        (acc.get_total_flops(), one.get_total_flops())


def test_save_grid_writes_torchvisions_png(tmp_path):
    """vtp.save_grid, the stage scripts' image grids, writes the bytes of torchvision's
    save_image (which they no longer import: it cost each of them 2 s to start)."""
    from PIL import Image
    from torchvision.utils import save_image
    for n, nrow in ((16, 8), (13, 4), (3, 8)):
        x = torch.rand(n, 3, 7, 9)
        save_image(x, tmp_path / 'theirs.png', nrow=nrow)
        vtp.save_grid(x, tmp_path / 'ours.png', nrow=nrow)
        theirs, ours = (np.asarray(Image.open(tmp_path / f)) for f in ('theirs.png', 'ours.png'))
        assert theirs.shape == ours.shape and (theirs == ours).all(), (n, nrow)


def test_sinkhorn_knopp_balances_prototypes():
    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 3
    q = vtp.sinkhorn_knopp(logits, 0.5, n_iters=50)
    torch.testing.assert_close(q.sum(1), torch.ones(64))  # each sample a distribution
    # equal prototype mass
    torch.testing.assert_close(q.sum(0), torch.full((8,), 8.0), rtol=1e-3, atol=1e-3)
    # a step without any masked patch (iBOT): no rows, no 0/0, and the loss of nothing is 0, not NaN
    empty = vtp.sinkhorn_knopp(torch.zeros(0, 8), 0.07)
    assert empty.shape == (0, 8)
    assert vtp.ibot_loss(torch.zeros(0, 8), empty, torch.zeros(0), n_images=4).item() == 0.0
    # iBOT's padded index: rows marked invalid take no mass and get zeros; the real rows' targets
    # are those of the real rows alone (even where the padding's logits are huge)
    valid = torch.rand(64) < 0.6
    padded = logits.masked_fill(~valid[:, None], 1e4)
    q = vtp.sinkhorn_knopp(padded, 0.07, valid=valid)
    torch.testing.assert_close(q[valid], vtp.sinkhorn_knopp(logits[valid], 0.07))
    assert (q[~valid] == 0).all()


def test_dino_ibot_koleo_equal_direct_computation():
    torch.manual_seed(0)
    n, K, n_local = 3, 5, 2
    s = torch.randn((2 + n_local) * n, K)
    t = torch.softmax(torch.randn(2 * n, K), -1)
    crops = s.split(n)
    ref, pairs = 0.0, 0
    for i in range(2 + n_local):
        for j in range(2):
            if i != j:
                for r in range(n):
                    ref += -(t[j * n + r] * torch.log_softmax(crops[i][r] / 0.1, -1)).sum() / n
                pairs += 1
    assert pairs == 2 + 2 * n_local
    torch.testing.assert_close(vtp.dino_loss(s, t, 0.1), ref / pairs)
    # without local crops DINOv2 divides the 2 global pairs by 2 + max(0, 1) = 3 (ssl_meta_arch.py)
    glob = sum(-(t[(1 - i) * n + r] * torch.log_softmax(crops[i][r] / 0.1, -1)).sum() / n
               for i in range(2) for r in range(n))
    torch.testing.assert_close(vtp.dino_loss(s[:2 * n], t, 0.1), glob / 3)

    sp, tp = torch.randn(4, K), torch.softmax(torch.randn(4, K), -1)
    w = torch.tensor([0.5, 0.5, 1.0, 0.0])  # image A: 2 masked, image B: 1 masked, then padding
    ce = [-(tp[i] * torch.log_softmax(sp[i] / 0.1, -1)).sum() for i in range(3)]
    torch.testing.assert_close(vtp.ibot_loss(sp, tp, w, n_images=4),
                               ((ce[0] + ce[1]) / 2 + ce[2]) / 4)

    x = torch.randn(6, 4)
    xn = F.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.eye(6) * 10
    torch.testing.assert_close(vtp.koleo_loss(x), -torch.log(d.min(1).values + 1e-8).mean(),
                               atol=1e-5, rtol=1e-5)


def test_update_ema_by_name():
    torch.manual_seed(0)
    student = vtp.VTP(small_config())
    teacher = vtp.VTP(replace(small_config(), train_clip=False, train_reconstruction=False))
    vtp.update_ema(teacher, student, 0.0)
    assert torch.equal(teacher.trunk.blocks[0].attn.qkv.weight,
                       student.trunk.blocks[0].attn.qkv.weight)
    before = teacher.dino_head.mlp[0].weight.clone()
    with torch.no_grad():
        student.dino_head.mlp[0].weight.add_(1.0)
    vtp.update_ema(teacher, student, 0.9)
    torch.testing.assert_close(teacher.dino_head.mlp[0].weight, before + 0.1)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _distributed_losses(rank, world, port, inputs, results):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world)
    img, txt, t_logits, s_logits = [x.clone() for x in inputs]
    n = len(img) // world
    mine = lambda x: x[rank * n:(rank + 1) * n]
    img_r, txt_r = mine(img).requires_grad_(), mine(txt).requires_grad_()
    loss = vtp.clip_loss(img_r, txt_r, torch.tensor(10.0))
    loss.backward()
    # DINO: teacher/student rows are crop-major chunks; each rank holds its samples of every crop
    m = t_logits.shape[0] // 2 // world

    def local(x, crops):
        return torch.cat([c[rank * m:(rank + 1) * m] for c in x.split(len(x) // crops)])

    probs = vtp.sinkhorn_knopp(local(t_logits, 2), 0.07)
    dino = vtp.dino_loss(local(s_logits, 4), probs)
    # iBOT's masked patches: rank 1 may hold none; Sinkhorn-Knopp still agrees with one process
    ibot = vtp.sinkhorn_knopp(t_logits[:5] if rank == 0 else t_logits[:0], 0.07)
    # compiled (train_tokenizer.py --compile) with its all_reduces: one graph (fullgraph), the
    # temperature a tensor so that a new value does not recompile, the same targets as eager
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend('aot_eager')
    sinkhorn = torch.compile(vtp.sinkhorn_knopp, dynamic=False, fullgraph=True, backend=counter)
    valid = torch.arange(2 * m) < m + rank  # padded rows, as iBOT's bucket
    compiled = [(sinkhorn(local(t_logits, 2), torch.tensor(t), valid=valid),
                 vtp.sinkhorn_knopp(local(t_logits, 2), t, valid=valid)) for t in (0.07, 0.05)]
    results[rank] = (loss.detach(), img_r.grad, txt_r.grad, dino, probs, ibot, compiled,
                     counter.frame_count)
    dist.destroy_process_group()


def test_distributed_clip_and_dino_equal_single_process():
    torch.manual_seed(0)
    N, K = 8, 16
    img, txt = F.normalize(torch.randn(N, 8), dim=-1), F.normalize(torch.randn(N, 8), dim=-1)
    t_logits, s_logits = torch.randn(2 * N, K), torch.randn(4 * N, K)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_losses, args=(2, _free_port(), (img, txt, t_logits, s_logits), results),
             nprocs=2)
    # single process on the concatenated batch
    img1, txt1 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = vtp.clip_loss(img1, txt1, torch.tensor(10.0))
    loss.backward()
    probs = vtp.sinkhorn_knopp(t_logits, 0.07)
    dino = vtp.dino_loss(s_logits, probs)
    r0, r1 = results[0], results[1]
    torch.testing.assert_close((r0[0] + r1[0]) / 2, loss.detach())
    # DDP averages gradients over ranks: per-rank feature gradients are world_size x the global
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]) / 2, img1.grad)
    torch.testing.assert_close(torch.cat([r0[2], r1[2]]) / 2, txt1.grad)
    torch.testing.assert_close((r0[3] + r1[3]) / 2, dino)
    # back to crop-major order
    local_probs = torch.cat([r0[4][:4], r1[4][:4], r0[4][4:], r1[4][4:]])
    torch.testing.assert_close(local_probs, probs)
    assert r1[5].shape == (0, K)
    torch.testing.assert_close(r0[5], vtp.sinkhorn_knopp(t_logits[:5], 0.07))
    for r in (r0, r1):
        assert r[7] == 1  # one graph for both temperatures
        for got, want in r[6]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_flops_count_matches_a_direct_count():
    cfg = vtp.VTP_CONFIGS['B']
    n = 257
    per_block = 2 * n * (3 * 768 * 768 + 768 * 768 + 3 * 768 * 2048) + 2 * 2 * n * n * 768
    blocks, embed = vtp.vtp_flops(cfg, 'encoder', 256), vtp.vtp_flops(cfg, 'embed', 256)
    assert blocks == 12 * per_block and embed == 2 * 256 * 3 * 16 * 16 * 768
    # LPIPS-VGG16 at 224 px: 15.3 GMACs (the known figure for VGG16's convolutions) + 1x1 lins
    assert abs(vtp.vtp_flops(cfg, 'lpips', 224) / 2 - 15.35e9) < 0.05e9
    # the objectives add up: CLIP adds the text tower, reconstruction the decoder and LPIPS
    args = SimpleNamespace(image_size=256, batch_size=1024)
    ae_cfg = replace(cfg, train_clip=False, train_ssl=False)
    ae = vtp.stage1_flops(ae_cfg, args, 0, 1.0, False, 0, 0)
    assert ae == 3 * blocks + 2 * embed + 3 * vtp.vtp_flops(cfg, 'decoder', 256)
    assert vtp.stage1_flops(ae_cfg, args, 0, 1.0, True, 0, 0) > ae
    clip_cfg = replace(cfg, train_ssl=False)
    both = vtp.stage1_flops(clip_cfg, args, 0, 0.125, False, 0, 0)
    assert both == pytest.approx(vtp.stage1_flops(clip_cfg, args, 0, 0, False, 0, 0) +
                                 0.125 * 3 * vtp.vtp_flops(cfg, 'decoder', 256))


# --- DINOv2's optimisation pieces and the memory lever --------------------------------------------


def test_param_groups_layer_decay_patch_embed_and_prototypes():
    m = vtp.VTP(small_config())  # 2 blocks
    groups = vtp.param_groups(m, 0.05, layer_decay=0.5, patch_embed_lr_mult=0.2)
    where = {id(p): g for g in groups for p in g['params']}
    mult = lambda p: where[id(p)]['lr_mult']
    L = 2
    assert mult(m.trunk.patch_embed.proj.weight) == 0.5 ** (L + 1) * 0.2
    assert mult(m.trunk.cls_token) == 0.5 ** (L + 1)
    assert mult(m.trunk.blocks[0].attn.qkv.weight) == 0.5 ** L
    assert mult(m.trunk.blocks[1].mlp.w1.weight) == 0.5
    assert (mult(m.trunk.norm.weight) == mult(m.dino_head.mlp[0].weight)
            == mult(m.pixel_decoder.proj_out.weight) == 1)
    assert where[id(m.dino_head.last_layer.weight_v)]['last_layer']
    assert not where[id(m.dino_head.mlp[0].weight)]['last_layer']
    # no weight decay on norms, biases, tokens, the logit scale, the prototypes' gains
    for p in (m.trunk.norm.weight, m.trunk.blocks[0].attn.qkv.bias, m.trunk.cls_token,
              m.logit_scale,
              m.dino_head.last_layer.weight_g, m.positional_embedding):
        assert where[id(p)]['weight_decay'] == 0.0
    assert where[id(m.trunk.blocks[0].attn.qkv.weight)]['weight_decay'] == 0.05
    assert sum(len(g['params']) for g in groups) == len(list(m.parameters()))


def test_clip_grad_norms_per_module():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    # norms 50, 0.5
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4, 0.0, 0.0])
    total = vtp.clip_grad_norms([[a], [b]], 1.0)
    # logged: the whole norm, unclipped
    assert total.item() == pytest.approx((50 ** 2 + 0.5 ** 2) ** 0.5)
    assert a.grad.norm().item() == pytest.approx(1.0)  # the large part clipped to 1 ...
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4, 0.0, 0.0]))  # ... the small one untouched
    # a global clip would have scaled the small part down 50x: per-module clipping avoids that


def test_drop_path_runs_the_branch_on_a_subset():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4)
    calls = []
    branch = lambda t: calls.append(len(t)) or torch.ones_like(t)
    out = vtp.drop_add_residual(x, branch, 0.25)
    assert calls == [6]  # int(8 * 0.75) samples computed, the other two cost nothing
    kept = ~(out == x).all(-1).all(-1)
    assert kept.sum() == 6
    torch.testing.assert_close(out[kept], x[kept] + 8 / 6)  # scaled by B / subset
    blk = vtp.Block(4, 1, ffn='mlp', norm='layernorm')
    blk.drop_path = 0.5
    assert torch.equal(blk.eval()(x), vtp.Block.forward(blk.eval(), x))  # eval: no drop
    assert not torch.equal(blk.train()(x), blk.eval()(x))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = vtp.VTP(small_config())
    for blk in m.trunk.blocks:
        blk.drop_path = 0.5  # the recomputation replays the RNG: the same samples are dropped
    x, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 8))
    grads = []
    for on in (False, True):
        m.set_grad_checkpointing(on)
        m.zero_grad()
        torch.manual_seed(1)
        out = m(images=x, tokens=tokens, n_rec=2)
        loss = (out['image_features'].sum() + out['text_features'].sum()
                + out['reconstruction'].square().mean())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
