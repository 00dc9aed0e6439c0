"""scripts/ablation.py's summary: per-seed values, their mean and spread, and each finding's effect
against twice the spread under the two pixel judges, the latent judge breaking a tie. The rows are
given (a finished run's results.jsonl, as the script writes it), so only the summary and the plot
run; tests/test_readme.py runs the whole pipeline."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_summary_has_per_seed_values_spreads_and_findings(tmp_path):
    # class accuracy (robust, crisp, latent judge) per (arm, tokenizer seed) at the DiT budget
    acc = {('AE', 12, 0): (20, 30, 10), ('AE', 12, 1): (22, 31, 11), ('AE', 12, 2): (21, 29, 12),
           ('CLIP+SSL+AE', 12, 0): (30, 33, 20), ('CLIP+SSL+AE', 12, 1): (31, 29, 21),
           ('CLIP+SSL+AE', 12, 2): (29, 31, 22), ('AE', 6, 0): (10, 10, 10),
           ('AE', 6, 1): (12, 12, 11), ('AE', 6, 2): (11, 11, 12)}
    rows = []
    for (name, step, seed), judged in acc.items():
        for dit_step, cfg, gain in ((3, 1.0, 0.5), (6, 1.0, 1), (6, 4.0, 1)):
            row = {'objectives': name, 'step': step, 'tokenizer_seed': seed, 'dit_step': dit_step,
                   'cfg_scale': cfg, 'role': 'final', 'pretrain_flops': 1e9 * step,
                   'linprobe_top1': 40.0, 'psnr': 20.0, 'latent_judge_real': 99.0}
            for j, a in zip(('robust', 'crisp', 'latent'), judged):
                row.update({f'gen_class_{j}': a * gain, f'gen_shape_{j}': a * gain,
                            f'gen_colour_{j}': 100.0})
            rows.append(row)
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = subprocess.run([sys.executable, ROOT / 'scripts/ablation.py', '--out-dir', tmp_path,
                        '--budgets', '6,12', '--dit-grid', '3', '--dit-steps', '6'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['tokenizer_seeds'] == 3 and summary['dit_steps'] == [3, 6]
    at = {(g['objectives'], g['step'], g['dit_step'], g['cfg_scale']): g['metrics']
          for g in summary['groups']}
    ae = at['AE', 12, 6, 1.0]['gen_class_robust']
    assert ae['per_seed'] == [20, 22, 21] and ae['mean'] == 21
    assert abs(ae['spread'] - statistics.stdev([20, 22, 21])) < 1e-12
    assert at['AE', 12, 3, 1.0]['gen_class_robust']['mean'] == 10.5  # the convergence curve
    finding = summary['findings']['CLIP+SSL+AE > AE']['cfg 1']
    # robust +9 against a spread of 1 holds, crisp +1 against 2 does not: the latent judge decides
    assert finding['robust'] == {'effect': 9.0, 'spread': 1.0, 'holds': True}
    assert finding['crisp']['effect'] == 1.0 and not finding['crisp']['holds']
    assert finding['latent']['holds'] and finding['verdict'].endswith('latent judge: holds')
    matched = summary['findings']['CLIP+SSL+AE > AE at matched PSNR (AE at 6 steps)']['cfg 4']
    assert matched['verdict'] == 'holds' and matched['crisp']['effect'] == 20.0
    assert 'latent judge: holds' in p.stdout and (tmp_path / 'ablation_curves.png').exists()


def test_bad_flags_and_foreign_results_are_one_line(tmp_path):
    # checked before anything trains: an unknown objective set, unparsable or mismatched budgets,
    # and an --out-dir whose results.jsonl another version wrote (its rows are kept as they are)
    (tmp_path / 'old').mkdir()
    old = '{"objectives": "AE", "step": 900, "dit_seed": 0}\n'
    (tmp_path / 'old' / 'results.jsonl').write_text(old)
    for flags, words in ((['--objectives', 'AE,FOO'], '--objectives are some of'),
                         (['--budgets', '300,x'], 'comma-separated numbers'),
                         (['--budgets', '300,1000'], 'a multiple of the first'),
                         (['--out-dir', tmp_path / 'old'], 'choose another --out-dir')):
        p = subprocess.run([sys.executable, ROOT / 'scripts/ablation.py', '--out-dir',
                            tmp_path / 'new', *flags], capture_output=True, text=True)
        assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
        assert p.stderr.startswith('error: ') and words in p.stderr, p.stderr
    assert (tmp_path / 'old' / 'results.jsonl').read_text() == old
    assert not list((tmp_path / 'new').iterdir())
