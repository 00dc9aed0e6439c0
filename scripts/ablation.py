"""
The ablation of paper §4.3 (fig. 2, 4) at toy scale, as one command: does understanding drive
generation, by more than the noise, once the DiT draws shapes?

The rule, fixed before the committed run (assets/ablation_*) was made:
  arms        AE-only and CLIP+SSL+AE tokenizers (train_tokenizer.py --seed 0..2, --budgets[-1]
              steps), and AE-only at --budgets[0] steps, whose PSNR is close to CLIP+SSL+AE's at
              the end (the semantic objectives cost reconstruction at equal steps; this arm
              compares generation at matched reconstruction). --objectives adds CLIP+AE, SSL+AE.
  DiT budget  chosen on a tokenizer outside the compared ones (AE-only, --pilot-seed), so that the
              choice cannot favour the hypothesis: the first of --dit-grid at which its unguided
              samples show their shape under both pixel judges, shape accuracy >= SHAPE_FLOOR
              (chance 20 %; 25 % is ~4 binomial errors above it at 1000 samples).
              Every arm's DiT (the toy recipe of train_dit.py, equal for all) is then judged at
              each --dit-grid step up to that budget: the convergence curve.
  metric      class accuracy of --num-samples class-balanced samples (1000: binomial error <= 1.6
              points), cfg 1 primary (as the paper's gFID), cfg 4 secondary, by three judges:
              robust and crisp, two CNNs trained on real images (evaluate.py synthetic), and
              latent, an MLP trained on the tokenizer's real cached latents and applied to the
              DiT's latents before decoding (neither the decoder nor sharpness decides).
  holds       effect (mean over tokenizer seeds, better minus worse, at the DiT budget) > twice
              the larger of the two arms' spreads (sample std over seeds), under the robust and
              the crisp judge; where those two disagree, the latent judge is reported as the
              tie-break. Read separately at cfg 1 and at cfg 4.
Also per checkpoint: zero-shot top-1, the bottleneck linear probe, PSNR (evaluate.py).

Results: OUT_DIR/results.jsonl (a row per tokenizer seed, DiT step and guidance), summary.json
(per-seed values, means, spreads, the findings), findings.md (their tables), ablation_curves.png
(class accuracy against DiT steps, one panel per judge, error bars the spread). A killed run
continues where it stopped.

    python scripts/ablation.py        # tiny on the synthetic data, 2 CPU cores: see README
    python scripts/ablation.py --size S --data /data/datacomp/{00000..00999}.tar \\
        --dit-data /data/imagenet/train --budgets 5000,20000 --tokenizer-args "--batch-size 4096" \\
        --dit-args "--model DiT-B/1 --batch-size 256" --dit-steps 20000 \\
        --launch "torchrun --nproc_per_node 8"
S/B/L on real data: the pixel judges only know the toy world, so the rows carry the latent judge's
class accuracy alone; score the samples with evaluate.py fid as well.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the repository's modules, found through ROOT)
from evaluate import JUDGES, judge_suffix  # noqa: E402  (the two pixel judges)

# name: the λ flags of train_tokenizer.py (eq. 3); an objective with weight 0 is off
OBJECTIVES = {
    'AE': ['--lambda-clip', '0', '--lambda-ssl', '0'],
    'CLIP+AE': ['--lambda-ssl', '0'],
    'SSL+AE': ['--lambda-clip', '0'],
    'CLIP+SSL+AE': [],
}
SHAPE_FLOOR = 25.0  # % shape accuracy of the pilot's unguided samples: the DiT draws shapes
ALL_JUDGES = (*JUDGES, 'latent')

parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
arg('--out-dir', default='out/ablation', help="where every run and the results go")
arg('--size', default='tiny', help="tokenizer preset (train_tokenizer.py --size)")
arg('--data', default='synthetic', help="tokenizer pre-training data")
arg('--dit-data', default='synthetic', help="generation data (class-labelled)")
arg('--objectives', default='AE,CLIP+SSL+AE', help="objective sets compared with AE-only")
arg('--budgets', default='300,900', help="pre-training steps: the matched-PSNR AE-only "
    "checkpoint, the run's length")
arg('--tokenizer-seeds', type=int, default=3, help="tokenizers per arm (seeds 0..N-1); the "
    "spread over them is the noise a finding must exceed")
arg('--pilot-seed', type=int, default=100, help="the AE-only tokenizer the DiT budget is chosen on")
arg('--dit-grid', default='1000,2000,4000,8000', help="DiT steps at which samples are judged")
arg('--dit-steps', type=int, default=0, help="the DiT budget (0: by the pilot, as above)")
arg('--num-samples', type=int, default=1000, help="samples per DiT step and guidance")
arg('--cfg-scales', default='1,4', help="guidance at the DiT budget (cfg 1 along the curve)")
arg('--sample-steps', type=int, default=50, help="Euler time points of the samples")
arg('--eval-images', type=int, default=5000, help="images of the linear probe's train set (its "
    "val set and the reconstruction metrics use a tenth, at least 64)")
arg('--condition', default='class', choices=['class', 'text'], help="class- or text-conditional "
    "DiTs (fig. 8: text on the synthetic captions, prompts 'a {class}.')")
arg('--text-encoder', default=None, help="--condition text: one VTP text tower for every DiT, "
    "so that only the latents differ (default: CLIP+SSL+AE seed 0's last checkpoint)")
arg('--tokenizer-args', default='', help="more flags for train_tokenizer.py")
arg('--dit-args', default='', help="more flags for train_dit.py")
arg('--launch', default=sys.executable,
    help="how a stage script is started, e.g. 'torchrun --standalone --nproc_per_node 8'")
args = parser.parse_args()
os.makedirs(args.out_dir, exist_ok=True)
results_path = os.path.join(args.out_dir, 'results.jsonl')
try:
    budgets = [int(b) for b in args.budgets.split(',')]
    grid = [int(s) for s in args.dit_grid.split(',')]
    cfg_scales = [float(s) for s in args.cfg_scales.split(',')]
except ValueError as e:
    raise SystemExit(f"error: --budgets, --dit-grid and --cfg-scales are comma-separated "
                     f"numbers ({e})")
first, last = budgets[0], budgets[-1]
names = ['AE'] + [n for n in args.objectives.split(',') if n != 'AE']  # AE-only: the baseline
if set(names) - set(OBJECTIVES) or last % first or min(budgets + grid) < 1:
    raise SystemExit(f"error: --objectives are some of {', '.join(OBJECTIVES)}; the budgets and "
                     "the DiT grid are positive, the last budget a multiple of the first")
if args.dit_data != 'synthetic' and not args.dit_steps:
    raise SystemExit("error: --dit-data other than synthetic needs --dit-steps (the budget rule "
                     "reads the toy world's judges)")
KEY = ('objectives', 'step', 'tokenizer_seed', 'dit_step', 'cfg_scale')  # a row's identity
done = {}
if os.path.exists(results_path):
    with open(results_path) as f:
        try:
            done = {tuple(r[k] for k in KEY): r for r in map(json.loads, f)}
        except (KeyError, ValueError):
            raise SystemExit(f"error: {results_path} holds rows this version does not write; "
                             "choose another --out-dir") from None


def run(script, *argv, launch=None):
    """A stage script in its own process; stops the ablation with its last lines if it fails."""
    cmd = shlex.split(launch or args.launch) + [os.path.join(ROOT, script)] + [str(a) for a in argv]
    print('$', ' '.join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)  # in our working folder (--out-dir)
    if p.returncode != 0:
        raise SystemExit(f"error: {script} failed:\n{(p.stdout + p.stderr)[-3000:]}")


def evaluate(*argv):
    out = os.path.join(args.out_dir, 'tmp_eval.json')
    run('evaluate.py', *argv, '--out', out, launch=sys.executable)
    with open(out) as f:
        return json.load(f)


def tokenizer(name, seed):
    """Pre-trains one tokenizer (its checkpoint at `first` kept) into its folder."""
    out = os.path.join(args.out_dir, f"{name.replace('+', '_')}_seed{seed}")
    if not os.path.exists(os.path.join(out, 'done')):
        flags = ['--size', args.size, '--data', args.data, '--out-dir', out, '--seed', seed,
                 '--max-steps', last, '--keep-every', first, '--eval-every', 0, *OBJECTIVES[name],
                 *shlex.split(args.tokenizer_args)]
        run('train_tokenizer.py', *flags, *(['--resume', 'auto'] if os.path.exists(out) else []))
        open(os.path.join(out, 'done'), 'w').close()


def tokenizer_figures(name, ckpt):
    """Compute, understanding and reconstruction of one checkpoint (cached beside it)."""
    path = ckpt.replace('.pt', '_figures.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    meta = torch.load(ckpt, map_location='cpu', weights_only=True, mmap=True)
    figures = {'pretrain_flops': meta['flops']}
    if 'CLIP' in name:
        figures['zeroshot_top1'] = evaluate('zeroshot', '--tokenizer', ckpt, '--data',
                                            args.data)['top1']
    n_val = max(64, args.eval_images // 10)
    figures['linprobe_top1'] = evaluate(
        'linprobe', '--tokenizer', ckpt, '--train', args.dit_data, '--val', args.dit_data,
        '--num-train', args.eval_images, '--num-val', n_val)['top1']
    figures['psnr'] = evaluate('recon', '--tokenizer', ckpt, '--data', args.dit_data, '--no-fid',
                               '--lpips', 'none', '--num-images', n_val)['psnr']
    with open(path, 'w') as f:
        json.dump(figures, f)
    return figures


def latent_judge(cache):
    """The pixel-free judge: an MLP trained on 90 % of a latent cache's images (plain and flipped,
    as the DiT sees them), normalised as the DiT reads them -> (the MLP, its accuracy in % on the
    other 10 %, the class count)."""
    ds = data.LatentDataset(cache, shuffle=False, flip=False)
    z = torch.cat([torch.cat((s['latents'], s['latents_flip'])) for s in ds.shards])
    y = torch.cat([torch.cat((s['labels'], s['labels'])) for s in ds.shards])
    z = ((z - ds.mean) / ds.std).flatten(1)
    image = torch.cat([torch.arange(len(s['labels'])).repeat(2) + start
                       for s, start in zip(ds.shards, ds.starts)])
    val = image >= int(0.9 * ds.n)  # both views of an image on the same side
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(z.shape[1], 256), torch.nn.GELU(),
                              torch.nn.Linear(256, ds.num_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train_z, train_y = z[~val], y[~val]
    for epoch in range(10):
        for idx in torch.randperm(len(train_y)).split(256):
            loss = torch.nn.functional.cross_entropy(net(train_z[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net.eval(), 100 * (net(z[val]).argmax(1) == y[val]).float().mean().item(), \
            ds.num_classes


def judge(samples, size, latent_net, num_classes):
    """Class, colour and shape accuracy (%) of one sample folder under the three judges (on
    other data than the toy world's: the latent judge's class accuracy only)."""
    row, toy = {}, args.dit_data == 'synthetic'
    if toy:  # the pixel judges know the toy world only
        g = evaluate('synthetic', '--samples', os.path.join(samples, 'samples.npz'),
                     '--image-size', size)
        row = {f'gen_{m}_{j}': g[f'{m}_accuracy{judge_suffix(j)}']
               for j in JUDGES for m in ('class', 'colour', 'shape')}
    with torch.no_grad():
        z = torch.from_numpy(np.load(os.path.join(samples, 'latents.npy'))).flatten(1)
        pred = latent_net(z).argmax(1)
    want = torch.arange(len(pred)) % num_classes  # sample.py's class-balanced labels (prompts)
    # class = 4 shape + colour (data.SyntheticDataset)
    for m, hit in (('class', pred == want), ('colour', pred % 4 == want % 4),
                   ('shape', pred // 4 == want // 4))[:3 if toy else 1]:
        row[f'gen_{m}_latent'] = 100 * hit.float().mean().item()
    return row


text_encoder = args.text_encoder or os.path.join(args.out_dir, 'CLIP_SSL_AE_seed0',
                                                 f'ckpt_{last:06d}.pt')
prompts_file = os.path.join(args.out_dir, 'prompts.txt')
if args.condition == 'text':
    with open(prompts_file, 'w') as f:
        f.writelines(f"a {c}.\n" for c in data.SyntheticDataset.class_names)


def dit(name, seed, step, steps, role, last_scales):
    """One DiT on one tokenizer checkpoint, trained in stages to each of `steps` (exact resume, a
    constant learning rate: the same run as one of max(steps)); at each, samples judged at cfg 1
    (and at each of last_scales at the last) -> the rows."""
    keys = [(name, step, seed, s, c) for s in steps
            for c in (last_scales if s == steps[-1] else [1.0])]
    out = os.path.join(args.out_dir, f"{name.replace('+', '_')}_seed{seed}")
    ckpt, dit_dir = os.path.join(out, f'ckpt_{step:06d}.pt'), os.path.join(out, f'dit_{step:06d}')
    flags = ['--tokenizer', ckpt, '--data', args.dit_data, '--out-dir', dit_dir,
             '--sample-every', 0, '--latent-dir', os.path.join(out, f'latents_{step:06d}'),
             *shlex.split(args.dit_args)]
    sample_flags = ['--prompts', prompts_file] if args.condition == 'text' else []
    if args.condition == 'text':
        flags += ['--condition', 'text', '--text-encoder', text_encoder]
    latent_net = None
    for key in [k for k in keys if k not in done]:  # what a finished (or killed) run has not
        s, c = key[3:]
        if latent_net is None:
            tokenizer(name, seed)
            figures = tokenizer_figures(name, ckpt)
            size = torch.load(ckpt, map_location='cpu', weights_only=True,
                              mmap=True)['config']['image_size']
        if not os.path.exists(os.path.join(dit_dir, f'done_{s}')):
            run('train_dit.py', *flags, '--max-steps', s,
                *(['--resume', 'auto'] if os.path.exists(os.path.join(dit_dir, 'ckpt.pt')) else []))
            open(os.path.join(dit_dir, f'done_{s}'), 'w').close()
        if latent_net is None:
            cache = os.path.join(out, f'latents_{step:06d}')
            cache = next(os.path.join(cache, d) for d in sorted(os.listdir(cache))
                         if os.path.exists(os.path.join(cache, d, 'meta.json')))
            latent_net, latent_real, num_classes = latent_judge(cache)
        samples = os.path.join(dit_dir, f'samples_{s:06d}_cfg{c:g}')
        run('sample.py', '--ckpt', os.path.join(dit_dir, 'ckpt.pt'), *sample_flags,
            '--num-samples', args.num_samples, '--cfg-scale', c, '--num-steps',
            args.sample_steps, '--out-dir', samples, '--save-latents', '--resume', 'auto')
        row = {'objectives': name, 'step': step, 'tokenizer_seed': seed, 'dit_step': s,
               'cfg_scale': c, 'role': role, **figures, 'latent_judge_real': latent_real,
               **judge(samples, size, latent_net, num_classes)}
        with open(results_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        done[key] = row
        print(json.dumps(row), flush=True)
    return [done[k] for k in keys]


# -----------------------------------------------------------------------------
# 1. the DiT budget, by the rule, on the pilot tokenizer; 2. every arm up to it
budget = args.dit_steps
if not budget:
    for s in grid:
        r = dit('AE', args.pilot_seed, last, [g for g in grid if g <= s], 'pilot', [1.0])[-1]
        budget = s
        if all(r[f'gen_shape_{j}'] >= SHAPE_FLOOR for j in JUDGES):
            break
    print(f"DiT budget: {budget} steps (pilot AE-only seed {args.pilot_seed}: shape "
          + ', '.join(f"{r[f'gen_shape_{j}']:.1f} %" for j in JUDGES) + f" at cfg 1, robust / "
          f"crisp; the rule asks >= {SHAPE_FLOOR} % under both)", flush=True)
steps = [g for g in grid if g < budget] + [budget]
arms = [(n, last) for n in names] + ([('AE', first)] if first < last else [])
for name, step in arms:
    for seed in range(args.tokenizer_seeds):
        dit(name, seed, step, steps, 'final', cfg_scales)


# -----------------------------------------------------------------------------
# 3. the summary: per-seed values, means, spreads; each finding under each judge
def seed_values(name, step, dit_step, scale, metric):
    rows = [done.get((name, step, seed, dit_step, scale), {})
            for seed in range(args.tokenizer_seeds)]
    return [r[metric] for r in rows if metric in r]


def stats(v):
    return {'per_seed': v, 'mean': sum(v) / len(v),
            'spread': statistics.stdev(v) if len(v) > 1 else float('nan')}


METRICS = ('pretrain_flops', 'zeroshot_top1', 'linprobe_top1', 'psnr', 'latent_judge_real',
           *(f'gen_{m}_{j}' for m in ('class', 'shape', 'colour') for j in ALL_JUDGES))
groups = [{'objectives': n, 'step': st, 'dit_step': s, 'cfg_scale': c,
           'metrics': {m: stats(v) for m in METRICS if (v := seed_values(n, st, s, c, m))}}
          for n, st in arms for s in steps for c in (cfg_scales if s == budget else [1.0])]
tests = {f'{n} > AE': ((n, last), ('AE', last)) for n in names[1:]}
if first < last and 'CLIP+SSL+AE' in names:
    tests[f'CLIP+SSL+AE > AE at matched PSNR (AE at {first} steps)'] = \
        (('CLIP+SSL+AE', last), ('AE', first))
findings = {}
for finding, (better, worse) in tests.items():
    for c in cfg_scales:
        res = {}
        for j in ALL_JUDGES:
            a, b = (seed_values(*arm, budget, c, f'gen_class_{j}') for arm in (better, worse))
            if a and b:
                effect = sum(a) / len(a) - sum(b) / len(b)
                noise = max(stats(a)['spread'], stats(b)['spread'])
                res[j] = {'effect': effect, 'spread': noise, 'holds': bool(effect > 2 * noise)}
        if len(res) < 3:
            continue
        pixel = [res[j]['holds'] for j in JUDGES]
        res['verdict'] = ('holds' if all(pixel) else 'does not hold' if not any(pixel) else
                          'the pixel judges disagree; latent judge: ' +
                          ('holds' if res['latent']['holds'] else 'does not hold'))
        findings.setdefault(finding, {})[f'cfg {c:g}'] = res
with open(os.path.join(args.out_dir, 'summary.json'), 'w') as f:
    json.dump({'tokenizer_seeds': args.tokenizer_seeds, 'dit_budget': budget, 'dit_steps': steps,
               'num_samples': args.num_samples, 'spread': 'sample standard deviation over the '
               'tokenizer seeds', 'groups': groups, 'findings': findings}, f, indent=1)


def cell(m, key):  # 'mean ± spread' of one metric of a group, '-' where it was not measured
    return f"{m[key]['mean']:.1f} ± {m[key]['spread']:.1f}" if key in m else '-'


# findings.md: the two tables the README reports (mean ± spread over seeds; accuracy in %)
pilot = [done[k] for k in sorted(done) if k[2] == args.pilot_seed and k[0] == 'AE']
lines = [f"DiT budget: {budget} steps" + (f", by the rule on AE-only seed {args.pilot_seed}, "
         "whose unguided shape accuracy (robust / crisp) was " + ', '.join(
             f"{r['gen_shape_robust']:.1f} / {r['gen_shape_crisp']:.1f} % at {r['dit_step']}"
             for r in pilot) if pilot else " (--dit-steps)"), '',
         f"Arms, mean ± spread over {args.tokenizer_seeds} tokenizer seeds; class accuracy (%, "
         f"chance 5) and shape accuracy (chance 20) of {args.num_samples} samples per seed; "
         "latent judge: its accuracy on held-out real latents", '',
         '| arm | tokenizer steps | PSNR | linear probe | zero-shot | latent judge | DiT steps '
         '| cfg | class: robust | crisp | latent | shape: robust | crisp | latent |',
         '|' + '---|' * 14]
for g in groups:
    m = g['metrics']
    lines.append(f"| {g['objectives']} | {g['step']} | " + ' | '.join(
        [cell(m, k) for k in ('psnr', 'linprobe_top1', 'zeroshot_top1', 'latent_judge_real')] +
        [str(g['dit_step']), f"{g['cfg_scale']:g}"] +
        [cell(m, f'gen_{k}_{j}') for k in ('class', 'shape') for j in ALL_JUDGES]) + ' |')
lines += ['', f"Findings at {budget} DiT steps: effect in class accuracy (points) and, in "
          "brackets, the larger spread of the two arms; holds = effect > 2 x spread", '',
          '| finding | cfg | robust | crisp | latent | verdict |', '|---|---|---|---|---|---|']
for finding, by_cfg in findings.items():
    for c, res in by_cfg.items():
        lines.append(f"| {finding} | {c[4:]} | " + ' | '.join(
            f"{res[j]['effect']:+.1f} ({res[j]['spread']:.1f})" for j in ALL_JUDGES)
            + f" | {res['verdict']} |")
with open(os.path.join(args.out_dir, 'findings.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
print('\n'.join(lines))

# -----------------------------------------------------------------------------
# 4. the convergence curves (as the paper's and VA-VAE's): class accuracy against DiT steps
try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit(f"results in {args.out_dir}; install matplotlib for the plot")
fig, ax = plt.subplots(1, 3, figsize=(14, 4))
for a, j in zip(ax, ALL_JUDGES):
    for n, st in arms:
        gs = [g for g in groups if (g['objectives'], g['step'], g['cfg_scale']) == (n, st, 1.0)
              and f'gen_class_{j}' in g['metrics']]
        v = [g['metrics'][f'gen_class_{j}'] for g in gs]
        psnr = gs[0]['metrics']['psnr']['mean'] if gs else float('nan')
        a.errorbar([g['dit_step'] for g in gs], [x['mean'] for x in v],
                   yerr=[x['spread'] for x in v], marker='o', capsize=3,
                   label=f"{n}, {st} tokenizer steps (PSNR {psnr:.1f} dB)")
    a.axhline(5, color='grey', lw=0.8, ls=':')
    a.set(xlabel='DiT steps', ylabel=f'class accuracy, {j} judge (%)', xscale='log',
          title=f'{j} judge, cfg 1')
    a.legend(fontsize=7)
fig.suptitle(f'mean and spread over {args.tokenizer_seeds} tokenizer seeds, '
             f'{args.num_samples} samples each; chance 5 %')
fig.tight_layout()
fig.savefig(os.path.join(args.out_dir, 'ablation_curves.png'), dpi=110)
print(f"results: {results_path}, summary.json, ablation_curves.png in {args.out_dir}")
