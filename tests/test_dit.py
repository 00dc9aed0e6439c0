"""LightningDiT, flow-matching loss and ODE sampler: parity with the official code (golden data made
by hustvl/LightningDiT and the authors' fork, tests/golden/README.md) and behaviour checks."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# the DiT, its flow-matching loss and sampler live in vtp.py (section 6)
from vtp import (DiT, DiTConfig, DIT_CONFIGS, flow_loss, flow_loss_terms, interpolate, sample_t,
                 time_grid, guided_velocity, euler_sample, sincos_pos_embed, rope_tables)

GOLDEN = Path(__file__).resolve().parent / 'golden'


def close(ours, official):
    # the tolerance of golden/README.md: max |ours - official| <= 1e-5 * max(1, max |official|)
    err = (ours - official).abs().max().item()
    assert err <= 1e-5 * max(1.0, official.abs().max().item()), f"max abs error {err:.3g}"


def tiny_config(**kw):
    # the golden shape: 8x8x8 latents, patch 1, 64 wide, 2 deep, 2 heads, 10 classes
    return replace(DiTConfig(input_size=8, in_channels=8, hidden_size=64, depth=2, num_heads=2,
                             num_classes=10),
                   **kw)


def randomize(model, seed=0, std=0.2):
    # non-zero weights everywhere (a fresh DiT is zero-initialised at its outputs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != 'pos_embed':
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


# --- parity with the official code ----------------------------------------------------------------

@pytest.fixture(scope='module')
def golden():
    g = torch.load(GOLDEN / 'ldit_tiny.pt', weights_only=True)
    return g, DiT.from_official(g['state_dict'], g['config']).eval()


@pytest.fixture(scope='module')
def detailed():
    d = torch.load(GOLDEN / 'ldit_tiny_detailed.pt', weights_only=True)
    return d, DiT.from_official(d['state_dict'], d['config']['config']).eval()


@torch.no_grad()
def test_official_forward_cfg_and_ode(golden):
    g, model = golden
    i, o = g['inputs'], g['outputs']
    close(model(i['x'], i['t'], i['y']), o['forward'])
    # the official CFG call takes 2B rows [x; x] with labels [y; null]; the sampler keeps the first
    # half, which our guided velocity (B rows) must equal, the official 3-channel quirk included
    B, want = len(i['cfg_x']) // 2, o['forward_with_cfg_scale4']
    assert torch.equal(i['cfg_x'][:B], i['cfg_x'][B:])
    v = guided_velocity(model, i['cfg_x'][:B], i['cfg_t'][0].item(), i['cfg_y'][:B], 4.0,
                        null_class=model.config.num_classes, cfg_channels=3)
    close(v, want[:B])
    close(euler_sample(model, i['ode_noise'], i['ode_y'], num_steps=10, shift=0.3),
          o['ode_euler10_shift0.3'])


def test_from_official_reads_config_prefixes_and_ema(golden):
    g, model = golden
    sd = g['state_dict']
    assert DiT.from_official(sd).config == model.config  # sizes read off the shapes
    ckpt = {'model': {'module.' + k: torch.zeros_like(v) for k, v in sd.items()},
            'ema': {'_orig_mod.' + k: v for k, v in sd.items()}, 'opt': {}, 'config': {}}
    loaded = DiT.from_official(ckpt, g['config'])
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k  # the EMA weights were taken
    bad = dict(sd, pos_embed=sd['pos_embed'] + 0.1)
    with pytest.raises(ValueError, match='pos_embed'):
        DiT.from_official(bad, g['config'])
    with pytest.raises(ValueError, match='not a LightningDiT'):
        DiT.from_official({'trunk.cls_token': torch.zeros(1, 1, 8)})
    with pytest.raises(ValueError, match='num_heads'):
        DiT.from_official({k: v for k, v in sd.items() if not k.startswith('feat_rope.')})


def test_fixed_tables_equal_official(golden):
    g, model = golden
    sd, cfg = g['state_dict'], model.config
    hd, grid = cfg.hidden_size // cfg.num_heads, cfg.input_size
    assert torch.allclose(sincos_pos_embed(cfg.hidden_size, grid).float()[None], sd['pos_embed'],
                          atol=1e-6)
    cos, sin = rope_tables(hd, grid)
    assert torch.allclose(cos, sd['feat_rope.freqs_cos'], atol=1e-6)
    assert torch.allclose(sin, sd['feat_rope.freqs_sin'], atol=1e-6)


@torch.no_grad()
def test_official_intermediates(detailed):
    d, m = detailed
    i, o = d['inputs'], d['outputs']
    x, t, y = i['x'], i['t'], i['y']
    h = m.x_embedder(x).flatten(2).transpose(1, 2) + m.pos_embed
    close(h, o['x_embed_plus_pos'])
    close(m.t_embedder.features(t, 256), o['t_freq'])
    c_t, c_y = m.t_embedder(t), m.y_embedder(y, False)
    close(c_t, o['t_emb'])
    close(c_y, o['y_emb'])
    for k, blk in enumerate(m.blocks):
        h = blk(h, c_t + c_y, m.feat_rope)
        close(h, o[f'block{k}_out'])
    close(m.final_layer(h, c_t + c_y), o['final_layer_out'])
    close(m(x, t, y), o['forward'])


@torch.no_grad()
def test_official_guidance_interval(detailed):
    d, m = detailed
    o, cfg = d['outputs'], d['config']['cfg']
    x, y, s, start = o['cfg_in_x'], o['cfg_in_y'], cfg['cfg_scale'], cfg['cfg_interval_start']
    null = cfg['null_class']
    close(guided_velocity(m, x[:2], o['cfg_t_hi'][0].item(), y[:2], s, 0.0, null, 3),
          o['cfg_nointerval_t_hi'][:2])
    for name in ('hi', 'lo'):  # t = 0.6 is guided, t = 0.05 < 0.125 is not
        t, want = o[f'cfg_t_{name}'], o[f'cfg_interval_t_{name}']
        # our sampler's guided velocity is the first half of the official (2B-row) output
        close(guided_velocity(m, x[:2], t[0].item(), y[:2], s, start, null, 3), want[:2])


@torch.no_grad()
def test_official_loss_terms(detailed):
    d, m = detailed
    i, o = d['inputs'], d['outputs']
    x1, x0, t = i['x1_data'], o['train_x0_noise'], o['train_t']
    xt, u = interpolate(x0, x1, t)
    close(xt, o['train_xt'])
    close(u, o['train_ut'])
    close(m(xt, t, i['y_train']), o['train_pred'])
    mse, cos = flow_loss_terms(o['train_pred'], x0, x1)
    close(mse, o['train_mse_per_sample'])
    close(cos, o['train_cos_per_sample'])
    close(mse.mean() + cos.mean(), o['train_total_loss'])
    t = o['fixedt_t']
    mse, cos = flow_loss_terms(m(interpolate(x0, x1, t)[0], t, i['y_train']), x0, x1)
    close(mse, o['fixedt_mse_per_sample'])
    close(cos, o['fixedt_cos_per_sample'])


@torch.no_grad()
def test_official_trajectories(detailed):
    d, m = detailed
    i, o, sc, cfg = d['inputs'], d['outputs'], d['config']['sampler'], d['config']['cfg']
    n, shift = sc['num_steps'], sc['timestep_shift']
    close(time_grid(n, shift), o['sample_t_grid'])
    traj = euler_sample(m, i['z_noise'], i['y_sample'], n, shift, return_trajectory=True)
    close(traj, o['sample_nocfg_traj'])
    traj = euler_sample(m, i['z_noise'], i['y_sample'], n, shift, cfg['cfg_scale'],
                        cfg['cfg_interval_start'],
                        cfg['null_class'], cfg_channels=cfg['guided_channels'],
                        return_trajectory=True)
    close(traj, o['sample_cfg_traj'][:, :2])  # the official batch is [guided half, its copy]
    close(traj[-1], o['sample_cfg_final'])


@torch.no_grad()
def test_official_init_is_zero_output(detailed):
    d, _ = detailed
    m = DiT.from_official(d['init_state_dict'], d['config']['config']).eval()
    ours = DiT(m.config)
    for k, v in d['init_state_dict'].items():  # same zero pattern and spread as the official init
        mine = ours.state_dict()[k]
        assert torch.equal(v == 0, mine == 0) or v.std() > 0, k
        if v.numel() > 100 and v.std() > 0:
            assert abs(mine.std() / v.std() - 1) < 0.1, k


# --- model behaviour ------------------------------------------------------------------------------

def test_zero_init_outputs_exactly_zero():
    torch.manual_seed(0)
    m = DiT(tiny_config())
    x, t, y = torch.randn(3, 8, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    assert torch.equal(m(x, t, y), torch.zeros_like(x))
    m.train()
    assert torch.equal(m(x, t, y), torch.zeros_like(x))


@pytest.mark.parametrize('kw', [dict(patch_size=2), dict(use_swiglu=False, use_rmsnorm=False,
                                                         use_qknorm=True),
                                dict(use_qknorm=True, wo_shift=True, learn_sigma=True),
                                dict(use_rope=False),
                                dict(mlp_ratio=2.0, num_heads=4)])
def test_variants_roundtrip_through_state_dict(kw):
    torch.manual_seed(0)
    m = randomize(DiT(tiny_config(**kw))).eval()
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 10])
    out = m(x, t, y)
    assert out.shape == x.shape and out.abs().max() > 0
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    # None: the sizes are read off the shapes; without RoPE num_heads is unknown, so pass the config
    m2 = DiT.from_official(sd, None if m.config.use_rope else m.config).eval()
    assert m2.config == m.config
    assert torch.equal(m2(x, t, y), out)


def test_label_dropout_uses_torch_rng():
    m = DiT(tiny_config(class_dropout_prob=0.5)).train()
    y = torch.arange(10).repeat(20)
    torch.manual_seed(3)
    emb = m.y_embedder(y, True)
    torch.manual_seed(3)
    dropped = torch.where(torch.rand(len(y)) < 0.5, 10, y)
    assert torch.equal(emb, m.y_embedder.embedding_table(dropped))
    assert 0.3 < (dropped == 10).float().mean() < 0.7
    assert torch.equal(m.y_embedder(y, False), m.y_embedder.embedding_table(y))  # eval: no dropout


def test_rope_is_a_rotation_of_relative_position():
    # <R(p) q, R(p') k> depends on p - p' only, per axis: check on a 1-D shift of both tokens
    cos, sin = rope_tables(16, 4)
    rot = lambda x, n: x * cos[n] + torch.stack((-x[1::2], x[0::2]), -1).flatten() * sin[n]
    q, k = torch.randn(16), torch.randn(16)
    # the pair (0,0)-(0,1) scores as the pair (1,0)-(1,1)
    assert torch.allclose(rot(q, 0) @ rot(k, 1), rot(q, 4) @ rot(k, 5), atol=1e-5)
    assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)


# --- flow matching --------------------------------------------------------------------------------

def test_flow_loss_terms_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    x0, x1, pred = (torch.randn(3, 4, 2, 5, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9])
    xt, u = interpolate(x0, x1, t)
    mse, cos = flow_loss_terms(pred, x0, x1)
    for b in range(3):
        assert torch.allclose(xt[b], t[b] * x1[b] + (1 - t[b]) * x0[b])
        assert torch.equal(u[b], x1[b] - x0[b])
        assert torch.allclose(mse[b], ((pred[b] - u[b]) ** 2).sum() / u[b].numel())
        pred_px, u_px = pred[b].flatten(1).T, u[b].flatten(1).T  # (pixels, C)
        c = [1 - (p @ v) / (p.norm() * v.norm()) for p, v in zip(pred_px, u_px)]
        assert torch.allclose(cos[b], torch.stack(c).mean(), atol=1e-6)


def test_flow_loss_replays_the_torch_rng():
    torch.manual_seed(0)
    m = randomize(DiT(tiny_config())).eval()
    x1, y = torch.randn(4, 8, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(7)
    loss, logs = flow_loss(m, x1, y, lognorm=(-0.5, 1.25))
    torch.manual_seed(7)
    x0 = torch.randn_like(x1)
    t = torch.sigmoid(torch.randn(4) * 1.25 - 0.5)
    mse, cos = flow_loss_terms(m(t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0,
                                 t, y), x0, x1)
    assert torch.allclose(logs['loss_mse'], mse.mean())
    assert torch.allclose(logs['loss_cos'], cos.mean())
    assert torch.allclose(loss, mse.mean() + cos.mean())
    torch.manual_seed(7)
    loss_nocos, _ = flow_loss(m, x1, y, lognorm=(-0.5, 1.25), use_cosine=False)
    assert torch.allclose(loss_nocos, mse.mean())


def test_sample_t_distributions():
    torch.manual_seed(0)
    t = sample_t(20000, lognorm=(-0.75, 1.0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() + 0.75) < 0.03 and abs(logit.std() - 1.0) < 0.03
    u = sample_t(20000, lognorm=None)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


# --- sampling -------------------------------------------------------------------------------------

def test_time_grid():
    assert torch.equal(time_grid(7, 0.0), torch.linspace(0, 1, 7))
    for s in (0.075, 0.3, 2.0):
        grid = time_grid(250, s)
        want = [s * (i / 249) / (1 + (s - 1) * i / 249) for i in range(250)]
        assert torch.allclose(grid, torch.tensor(want), atol=1e-6)
        # fp32 as upstream: the last point is 1 to within 1e-6
        assert grid[0] == 0 and abs(grid[-1] - 1) < 1e-6 and (grid.diff() > 0).all()
    # 232 of 249 steps start below t = 0.5 (shift 0.075)
    assert (time_grid(250, 0.075)[:-1] < 0.5).sum() == 232
    assert (time_grid(250, 0.3)[:-1] < 0.11).sum() == 73


def test_guidance():
    torch.manual_seed(0)
    m = randomize(DiT(tiny_config())).eval()
    calls = []
    # a 2B batch rounds differently from a B batch
    near = lambda a, b: torch.allclose(a, b, atol=1e-4)
    fn = lambda x, t, y: calls.append(len(x)) or m(x, t, y)
    x, y = torch.randn(2, 8, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        tt = torch.full((2,), 0.5)
        cond, uncond = m(x, tt, y), m(x, tt, torch.full_like(y, 10))
        # scale 1 is the conditional path, in one B-row call
        assert torch.equal(guided_velocity(fn, x, 0.5, y, 1.0, null_class=10),
                           cond) and calls == [2]
        # all channels by default, cond and uncond batched in one 2B-row call
        v = guided_velocity(fn, x, 0.5, y, 4.0, null_class=10)
        assert calls[-1] == 4 and near(v, uncond + 4 * (cond - uncond))
        v3 = guided_velocity(fn, x, 0.5, y, 4.0, null_class=10, cfg_channels=3)
        assert torch.equal(v3[:, :3], v[:, :3]) and near(v3[:, 3:], cond[:, 3:])
        # guidance interval: conditional only while t < start
        assert torch.equal(guided_velocity(fn, x, 0.5, y, 4.0, 0.6, 10), cond) and calls[-1] == 2
        noise = torch.randn(2, 8, 8, 8)
        assert torch.equal(euler_sample(m, noise, y, 6, 0.3, cfg_scale=1.0, null_class=10),
                           euler_sample(m, noise, y, 6, 0.3))


def test_heun_is_second_order():
    # dx/dt = -x: exact x(1) = x(0)/e; Heun's error falls ~4x per halving of the step, Euler's ~2x
    fn = lambda x, t, y: -x
    x0, y = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    exact = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    err = lambda n, heun: (euler_sample(fn, x0, y, n, heun=heun) - exact).abs().item()
    assert 3.5 < err(11, True) / err(21, True) < 4.5
    assert 1.8 < err(11, False) / err(21, False) < 2.2
    assert err(11, True) < err(11, False) / 10


def test_tiny_dit_learns_a_toy_distribution():
    # 4 classes, each a fixed latent pattern plus a little noise: the flow loss must fall
    torch.manual_seed(0)
    cfg = replace(DIT_CONFIGS['DiT-T/1'], input_size=4, in_channels=4, num_classes=4, depth=2)
    m = DiT(cfg).train()
    means = torch.randn(4, 4, 4, 4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3,
                            betas=(0.9, 0.95))
    losses = []
    for step in range(60):
        y = torch.randint(0, 4, (64,))
        x1 = means[y] + 0.1 * torch.randn(64, 4, 4, 4)
        loss, logs = flow_loss(m, x1, y, lognorm=(0.0, 1.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
