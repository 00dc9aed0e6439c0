"""scripts/ablation.py's summary: per-seed values, their mean and spread, and each finding's effect
against twice the spread under both judges. The rows are given (a finished run's results.jsonl, as
the script writes it), so only the summary runs; tests/test_readme.py runs the whole pipeline."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_summary_has_per_seed_values_spreads_and_findings(tmp_path):
    # class accuracy per (objectives, tokenizer seed) at the last budget, two judges, cfg 1
    acc = {('AE', 0): (20, 30), ('AE', 1): (22, 31), ('AE', 2): (21, 29),
           ('CLIP+SSL+AE', 0): (30, 33), ('CLIP+SSL+AE', 1): (31, 29), ('CLIP+SSL+AE', 2): (29, 31)}
    rows = []
    for (name, seed), (robust, crisp) in acc.items():
        (tmp_path / f"{name.replace('+', '_')}_seed{seed}").mkdir()
        (tmp_path / f"{name.replace('+', '_')}_seed{seed}" / 'done').touch()
        for step, gain in ((6, 0), (12, 1)):
            rows.append({'objectives': name, 'step': step, 'tokenizer_seed': seed, 'dit_seed': 0,
                         'cfg_scale': 1.0, 'pretrain_flops': 1e9 * step, 'linprobe_top1': 40.0,
                         'psnr': 20.0, 'recon_robust': 70.0, 'recon_crisp': 50.0,
                         'gen_acc_robust': robust * gain, 'gen_acc_crisp': crisp * gain,
                         'gen_fd_robust': 100.0, 'gen_fd_crisp': 200.0})
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = subprocess.run([sys.executable, ROOT / 'scripts/ablation.py', '--out-dir', tmp_path,
                        '--objectives', 'AE,CLIP+SSL+AE', '--budgets', '6,12', '--cfg-scales', '1'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['tokenizer_seeds'] == 3
    last = {g['objectives']: g['metrics'] for g in summary['groups'] if g['step'] == 12}
    ae = last['AE']['gen_acc_robust']
    assert ae['per_seed'] == [20, 22, 21] and ae['mean'] == 21
    assert abs(ae['spread'] - statistics.stdev([20, 22, 21])) < 1e-12
    finding = summary['findings']['understanding drives generation: CLIP+SSL+AE > AE']['cfg 1']
    # robust judge: +9 against a spread of 1 (holds); crisp judge: +1 against 2 (does not)
    assert finding['robust'] == {'effect': 9.0, 'spread': 1.0, 'holds': True}
    assert finding['crisp']['effect'] == 1.0 and not finding['crisp']['holds']
    assert 'does not hold' in p.stdout and (tmp_path / 'ablation_cfg1.png').exists()
