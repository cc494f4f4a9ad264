"""reproduce.py's report: the paper's figures, means over seeds, the claims and their verdicts, the figures
(matplotlib, Agg) and report.md / results.json. Pure functions of what reproduce.py measured."""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

HEADS = ('cls', 'dist', 'avg')
HEAD_NAMES = {'cls': 'class head', 'dist': 'distillation head', 'avg': 'average of both'}
VARIANT_NAMES = {
    'none': 'DeiT-Ti, no distillation',
    'soft_convnet': 'DeiT-Ti distilled, soft, convnet teacher',
    'hard_convnet': 'DeiT-Ti distilled, hard, convnet teacher',
    'soft_transformer': 'DeiT-Ti distilled, soft, transformer teacher',
    'hard_transformer': 'DeiT-Ti distilled, hard, transformer teacher',
    'two_class_tokens': 'control: second class token (--dist-head-on-labels)',
    'teacher_convnet': 'convnet teacher', 'teacher_transformer': 'transformer teacher',
}
SHORT_NAMES = {'none': 'no distillation', 'soft_convnet': 'soft,\nconvnet teacher',
               'hard_convnet': 'hard,\nconvnet teacher', 'soft_transformer': 'soft,\ntransformer teacher',
               'hard_transformer': 'hard,\ntransformer teacher',
               'two_class_tokens': 'control:\ntwo class tokens'}

# ============ the paper's figures (DeiT, arXiv 2012.12877: ImageNet top-1 %, 300 epochs, DeiT-B students) ============

# Table 5 (teacher RegNetY-16GF, 82.9): none 81.8; "usual" soft and hard distillation with the class token only
# (no distillation token) 81.8 and 83.0; DeiT-B distilled (hard), class / distillation / both heads 83.0 / 83.1 / 83.4.
# Table 2: teachers of similar accuracy, RegNetY-8GF 81.7 and DeiT-B 81.8, give students of 82.7 and 81.9.
# Section 5.1 (text): no gain from a second class token (no figure given).
PAPER_ACCURACY = {
    ('none', 'avg'): '81.8 (T5)',
    ('soft_convnet', 'avg'): '81.8 (T5, class token only)',
    ('hard_convnet', 'cls'): '83.0 (T5)', ('hard_convnet', 'dist'): '83.1 (T5)', ('hard_convnet', 'avg'): '83.4 (T5)',
    ('hard_transformer', 'avg'): '81.9 (T2; 82.7 from the convnet of equal accuracy)',
    ('two_class_tokens', 'avg'): 'no gain over none (text)',
}
PAPER_TEACHERS = {'convnet': '82.9 (RegNetY-16GF, T5); 81.7 (RegNetY-8GF, T2)', 'transformer': '81.8 (DeiT-B, T2)'}
# Section 5.1: cosine of the learned class and distillation tokens 0.06, of their outputs after the last block
# 0.93; two class tokens converge to the same vector (0.999) and their outputs are "quasi-identical".
PAPER_TOKENS = {'hard_convnet': ('0.06', '0.93'), 'two_class_tokens': ('0.999', 'quasi-identical (text)')}
# Table 4: fraction of ImageNet val images on which two classifiers' top-1 differ.
TABLE4_NAMES = ['ground truth', 'convnet teacher', 'DeiT-Ti, no distillation', 'hard student: class head',
                'hard student: distillation head', 'hard student: average']
PAPER_TABLE4 = [[0.000, 0.171, 0.182, 0.170, 0.169, 0.166],
                [0.171, 0.000, 0.133, 0.112, 0.100, 0.102],
                [0.182, 0.133, 0.000, 0.109, 0.110, 0.107],
                [0.170, 0.112, 0.109, 0.000, 0.050, 0.033],
                [0.169, 0.100, 0.110, 0.050, 0.000, 0.019],
                [0.166, 0.102, 0.107, 0.033, 0.019, 0.000]]

# ============ numbers ============


def duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f'{hours}h{m:02d}m' if hours else f'{m}m{s:02d}s'


def mean_std(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and count."""
    v = np.asarray(values, dtype=float)
    return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0, 'n': len(v)}


def fmt(stat: Optional[Dict[str, Any]], digits: int = 1) -> str:
    return '—' if stat is None else f'{stat["mean"]:.{digits}f} ± {stat["std"]:.{digits}f}'


def verdict(diffs: Sequence[float], kind: str) -> str:
    """The verdict on paired per-seed differences a - b: kind '>' claims a > b, kind '<=' claims a is no better.

    A difference counts when it exceeds two standard errors of its mean (about a 95% interval); one seed gives
    its sign only.
    """
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return f'one seed: no verdict (difference {d[0]:+.3g})'
    m, se = d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    if kind == '>':
        return 'holds' if m > 2 * se else ('reversed' if m < -2 * se else 'not shown (within 2 SE)')
    return 'holds' if m <= 2 * se else 'does not hold (better by more than 2 SE)'


def per_seed(measured: Dict[str, Any], agreement: Dict[str, Any]) -> Dict[str, Any]:
    """Figures by variant and seed: top-1 per head, token cosines, disagreement of each head with each teacher."""
    out: Dict[str, Any] = {'acc1': {}, 'params': {}, 'blocks': {}, 'table4': agreement['table4_per_seed']}
    for r in sorted(measured['runs'].values(), key=lambda r: r['seed']):
        if not r['variant']:
            continue
        for head, acc in r['acc1'].items():
            out['acc1'].setdefault(r['variant'], {}).setdefault(head, []).append(acc)
        if r['tokens']:
            out['params'].setdefault(r['variant'], []).append(r['tokens']['params'])
            out['blocks'].setdefault(r['variant'], []).append(r['tokens']['blocks'])
    out['with_teachers'] = agreement['with_teachers']
    return out


def summarise(measured: Dict[str, Any], seeds: Dict[str, Any]) -> Dict[str, Any]:
    """Mean +- std over seeds of every figure of the report (the JSON behind its tables)."""
    runs = measured['runs']
    blocks = {v: np.asarray(b) for v, b in seeds['blocks'].items()}  # [seeds, depth]
    table4 = np.asarray(seeds['table4'])  # [seeds, 6, 6]
    return {
        'teachers': {t: {'model': runs[f'teacher_{t}']['model'], 'epochs': runs[f'teacher_{t}']['epochs'],
                         'acc1': runs[f'teacher_{t}']['acc1']['avg']} for t in ('convnet', 'transformer')},
        'accuracy': {v: {h: mean_std(a) for h, a in heads.items()} for v, heads in seeds['acc1'].items()},
        'tokens': {v: {'params': mean_std(seeds['params'][v]),
                       'blocks_mean': b.mean(0).tolist(), 'blocks_std': (b.std(0, ddof=1) if len(b) > 1
                                                                         else 0 * b[0]).tolist(),
                       'last_block': mean_std(b[:, -1])} for v, b in blocks.items()},
        'table4': {'names': TABLE4_NAMES, 'mean': table4.mean(0).tolist(),
                   'std': (table4.std(0, ddof=1) if len(table4) > 1 else 0 * table4[0]).tolist(),
                   'paper': PAPER_TABLE4},
        'with_teachers': {v: {h: {t: mean_std(d) for t, d in ts.items()} for h, ts in heads.items()}
                          for v, heads in seeds['with_teachers'].items()},
    }


def claims(seeds: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The section 5 claims, each a paired comparison over seeds: (claim, paper, a, b, difference, verdict)."""
    acc, table4 = seeds['acc1'], np.asarray(seeds['table4'])
    last = {v: [b[-1] for b in blocks] for v, blocks in seeds['blocks'].items()}
    spec = [
        ('hard distillation beats soft (convnet teacher, both heads)', '83.0 vs 81.8 (T5, class token only)',
         acc['hard_convnet']['avg'], acc['soft_convnet']['avg'], '>', '%'),
        ('soft distillation is no better than none', '81.8 vs 81.8 (T5)',
         acc['soft_convnet']['avg'], acc['none']['avg'], '<=', '%'),
        ('hard distillation beats none', '83.4 vs 81.8 (T5)', acc['hard_convnet']['avg'], acc['none']['avg'], '>', '%'),
        ('a convnet teacher beats a transformer teacher (hard, both heads)', '82.7 vs 81.9 (T2)',
         acc['hard_convnet']['avg'], acc['hard_transformer']['avg'], '>', '%'),
        ('the heads are complementary: both beat the class head (hard, convnet)', '83.4 vs 83.0 (T5)',
         acc['hard_convnet']['avg'], acc['hard_convnet']['cls'], '>', '%'),
        ('the heads are complementary: both beat the distillation head', '83.4 vs 83.1 (T5)',
         acc['hard_convnet']['avg'], acc['hard_convnet']['dist'], '>', '%'),
        ('the distillation head beats the class head', '83.1 vs 83.0 (T5)',
         acc['hard_convnet']['dist'], acc['hard_convnet']['cls'], '>', '%'),
        ('the distillation head agrees more with the convnet teacher than the class head (disagreement, class '
         'vs distillation head)', '0.112 vs 0.100 (T4)', table4[:, 3, 1], table4[:, 4, 1], '>', 'fraction'),
        ('the class head agrees more with DeiT without distillation than the distillation head (disagreement, '
         'distillation vs class head)', '0.110 vs 0.109 (T4)', table4[:, 4, 2], table4[:, 3, 2], '>', 'fraction'),
        ('two class tokens end closer than a class and a distillation token (cosine of the learned tokens)',
         '0.999 vs 0.06 (text)', seeds['params']['two_class_tokens'], seeds['params']['hard_convnet'], '>', 'cosine'),
        ('... and after the last block (cosine of the outputs)', 'quasi-identical vs 0.93 (text)',
         last['two_class_tokens'], last['hard_convnet'], '>', 'cosine'),
        ('the control (second class token) gains nothing over none', 'no gain (text)',
         acc['two_class_tokens']['avg'], acc['none']['avg'], '<=', '%'),
    ]
    result = []
    for text, paper, a, b, kind, unit in spec:
        diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
        result.append({'claim': text, 'paper': paper, 'unit': unit, 'a': mean_std(a), 'b': mean_std(b),
                       'difference': mean_std(diff), 'kind': kind, 'verdict': verdict(diff, kind)})
    return result

# ============ figures ============


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(summary: Dict[str, Any], out: Path) -> None:
    """Top-1 of every variant and head, mean and std over seeds; the teachers as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=100)
    variants = list(summary['accuracy'])
    for i, head in enumerate(HEADS):
        stats = [summary['accuracy'][v].get(head) for v in variants]
        x = [j + (i - 1) * 0.27 for j, s in enumerate(stats) if s]
        ax.bar(x, [s['mean'] for s in stats if s], 0.27, yerr=[s['std'] for s in stats if s], capsize=3,
               label=HEAD_NAMES[head])
    for (teacher, t), style in zip(summary['teachers'].items(), ('--', ':')):
        ax.axhline(t['acc1'], color='k', linestyle=style, linewidth=1, label=f'{teacher} teacher ({t["model"]})')
    ax.set_xticks(range(len(variants)), [SHORT_NAMES[v] for v in variants], fontsize=8)
    ax.set_xlabel('DeiT-Ti student')
    ax.set_ylabel('top-1 accuracy on DIGITS val (%)')
    lows = [s['mean'] - s['std'] for heads in summary['accuracy'].values() for s in heads.values()]
    ax.set_ylim(max(0.0, min(lows) - 5), 100)
    ax.legend(fontsize=7, loc='lower center', bbox_to_anchor=(0.5, 1.0), ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_token_cosines(summary: Dict[str, Any], out: Path) -> None:
    """Cosine of the class and distillation tokens: learned (block 0) then after each block, mean and std."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for variant, t in summary['tokens'].items():
        mean = [t['params']['mean'], *t['blocks_mean']]
        std = np.asarray([t['params']['std'], *t['blocks_std']])
        x = np.arange(len(mean))
        ax.plot(x, mean, marker='o', markersize=3, label=VARIANT_NAMES[variant])
        ax.fill_between(x, np.asarray(mean) - std, np.asarray(mean) + std, alpha=0.15)
    ax.axhline(0.93, color='k', linestyle=':', linewidth=1, label='paper: 0.93 after the last block')
    ax.axhline(0.06, color='k', linestyle='--', linewidth=1, label='paper: 0.06 between the learned tokens')
    ax.set_xlabel('block (0: the learned tokens, i: the output of block i)')
    ax.set_ylabel('cosine similarity (class, distillation token)')
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_disagreement(summary: Dict[str, Any], out: Path) -> None:
    """Table 4: ours (mean over seeds) beside the paper's, as two heat maps with their figures."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=100)
    names = summary['table4']['names']
    for ax, matrix, title in zip(axes, (summary['table4']['mean'], summary['table4']['paper']),
                                 ('ours (DIGITS val, mean over seeds)', 'paper (ImageNet val, Table 4)')):
        image = ax.imshow(matrix, cmap='viridis', vmin=0)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f'{value:.3f}', ha='center', va='center', fontsize=7, color='w')
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label='fraction of val images classified differently')
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_curves(measured: Dict[str, Any], out: Path) -> None:
    """Test top-1 and train loss per epoch: each teacher, and each student variant's mean over seeds."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    curves: Dict[str, List[List[Dict[str, Any]]]] = {}
    for name, r in measured['runs'].items():
        curves.setdefault(r['variant'] or name, []).append(r['log'])
    for label, logs in curves.items():
        length = min(len(log) for log in logs)
        epochs = [line['epoch'] + 1 for line in logs[0][:length]]
        for ax, key in ((acc_ax, 'test_acc1'), (loss_ax, 'train_loss')):
            ax.plot(epochs, np.mean([[line[key] for line in log[:length]] for log in logs], axis=0),
                    label=VARIANT_NAMES.get(label, label), linestyle='--' if label.startswith('teacher') else '-')
    acc_ax.set_ylabel('test top-1 accuracy (%)')
    loss_ax.set_ylabel('train loss, each run\'s own objective (nats per image)')
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel('epoch')
    acc_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


FIGURES = {'accuracy.png': plot_accuracy, 'token_cosines.png': plot_token_cosines,
           'disagreement.png': plot_disagreement}

# ============ report.md and results.json ============


def describe(setting: Any, sizes: Dict[str, int], teachers: Dict[str, str]) -> List[str]:
    """Why the setting is what it is, one line per choice."""
    train, val = round(setting.train_fraction * sizes['train']), round(setting.val_fraction * sizes['val'])
    return [
        f'Data: DIGITS, {train} training images ({setting.train_fraction:.0%} of {sizes["train"]}, about '
        f'{train // 10} per class) and {val} validation images ({setting.val_fraction:.0%} of {sizes["val"]}). '
        'A data-poor regime on purpose: the '
        'paper\'s point is that a transformer, which lacks a convnet\'s inductive biases, learns them from a convnet '
        'teacher when data alone does not teach them (ImageNet has about 1,300 images per class).',
        f'Input {setting.input_size}x{setting.input_size}: the 8x8 scans upscaled 4x, 2x2 patches of 16 pixels for '
        'DeiT-Ti (patch 16), and main.py\'s recipe for small inputs (a padded random crop instead of '
        'RandomResizedCrop, which at 8% of the area would keep a corner of a digit).',
        f'Recipe: main.py\'s defaults, the paper\'s Table 9 (AdamW, weight decay 0.05, cosine schedule, 5 warmup '
        'epochs, label smoothing 0.1, RandAugment, random erasing 0.25, Mixup 0.8, CutMix 1.0, stochastic depth 0.1), '
        f'batch {setting.batch_size}, except: lr {setting.lr:g} per step unscaled (the paper\'s value for its batch '
        'of 512; scaling it by 64/512 would leave a few hundred steps at 6e-5), and no weight EMA (its 0.99996 decay '
        'per step leaves the average at its start in a run this short; the paper found EMA of little help).',
        f'Length: {setting.student_epochs} epochs per student '
        f'({setting.student_epochs * (train // setting.batch_size)} steps of {setting.batch_size} images, what '
        f'{len(SHORT_NAMES)} variants x 5 seeds afford in under an hour on 2 CPU cores). The teachers train '
        'longer, so that each is clearly better than a student trained alone (the '
        f'paper\'s teachers are converged models): {setting.transformer_epochs} epochs for the transformer (a plain '
        f'DeiT-Ti, the student\'s architecture, as the paper\'s DeiT-B teacher of DeiT-B students) and '
        f'{setting.convnet_epochs} for the convnet ({teachers["convnet"]}), which learns more slowly per step here '
        '(probes of 30 epochs on all 1442 images, before any student: regnety_002 54%, DeiT-Ti 81%), to come near the '
        'transformer\'s accuracy as the paper\'s pair of teachers (RegNetY-8GF 81.7, DeiT-B 81.8). Every setting '
        'was chosen before any student was trained, and none was changed after.',
        'Distillation: --distillation-alpha 0.5 and --distillation-tau 1.0 (main.py\'s defaults, the paper\'s). '
        'Students evaluate the average of both heads (--eval-head avg) during training; each head is measured '
        'after training on the final weights (not the best epoch\'s, which would select on the validation images).',
    ]


def _accuracy_rows(summary: Dict[str, Any]) -> List[str]:
    rows = ['| variant | head | runs | top-1 (%), ours | paper (ImageNet, DeiT-B) |', '|---|---|---|---|---|']
    for variant, heads in summary['accuracy'].items():
        for head, stat in heads.items():
            shown = head if len(heads) > 1 else 'the only head'
            rows.append(f'| {VARIANT_NAMES[variant]} | {shown} | {stat["n"]} | {fmt(stat)} | '
                        f'{PAPER_ACCURACY.get((variant, head), "—")} |')
    return rows


def _token_rows(summary: Dict[str, Any]) -> List[str]:
    rows = ['| variant | runs | learned tokens, ours | paper | after the last block, ours | paper |',
            '|---|---|---|---|---|---|']
    for variant, t in summary['tokens'].items():
        paper = PAPER_TOKENS.get(variant, ('—', '—'))
        rows.append(f'| {VARIANT_NAMES[variant]} | {t["params"]["n"]} | {fmt(t["params"], 3)} | {paper[0]} | '
                    f'{fmt(t["last_block"], 3)} | {paper[1]} |')
    return rows


def _matrix_rows(names: List[str], cells: List[List[str]]) -> List[str]:
    return ([f'| | {" | ".join(names)} |', '|---' * (len(names) + 1) + '|']
            + [f'| {name} | {" | ".join(row)} |' for name, row in zip(names, cells)])


def _agreement_rows(summary: Dict[str, Any]) -> List[str]:
    rows = ['| variant | head | runs | disagreement with the convnet teacher | with the transformer teacher |',
            '|---|---|---|---|---|']
    for variant, heads in summary['with_teachers'].items():
        for head, ts in heads.items():
            rows.append(f'| {VARIANT_NAMES[variant]} | {head} | {ts["convnet"]["n"]} | {fmt(ts["convnet"], 3)} | '
                        f'{fmt(ts["transformer"], 3)} |')
    return rows


def _claim_rows(found: List[Dict[str, Any]]) -> List[str]:
    rows = ['| claim | paper | ours: a vs b | paired difference a - b (runs) | verdict |', '|---|---|---|---|---|']
    for c in found:
        digits = 1 if c['unit'] == '%' else 3
        rows.append(f'| {c["claim"]} | {c["paper"]} | {c["a"]["mean"]:.{digits}f} vs {c["b"]["mean"]:.{digits}f} | '
                    f'{fmt(c["difference"], digits)} ({c["difference"]["n"]}) | **{c["verdict"]}** |')
    return rows


def _timing_rows(measured: Dict[str, Any]) -> List[str]:
    kinds: Dict[str, List[Dict[str, Any]]] = {}
    for name, r in measured['runs'].items():
        kinds.setdefault(r['variant'] or name, []).append(r['done'])
    rows = ['| runs of | count | epochs | wall time per run | CPU time per run |', '|---|---|---|---|---|']
    for kind, done in kinds.items():
        rows.append(f'| {VARIANT_NAMES.get(kind, kind)} | {len(done)} | {done[0]["epochs"]} | '
                    f'{duration(np.mean([d["wall_s"] for d in done]))} | '
                    f'{duration(np.mean([d["cpu_s"] for d in done]))} |')
    cpu = sum(r['done']['cpu_s'] for r in measured['runs'].values())
    rows += ['', f'All runs together used {duration(cpu)} of CPU time (user + system, each run on '
             f'{next(iter(measured["runs"].values()))["done"]["threads"]} thread(s)). On an idle machine with C cores '
             f'running C runs side by side the grid takes about that divided by C: {duration(cpu / 2)} on 2 cores.']
    return rows


def markdown(made: Dict[str, Any], setting: Dict[str, Any], summary: Dict[str, Any],
             found: List[Dict[str, Any]], measured: Dict[str, Any]) -> str:
    """report.md: what made it, the setting, then every table with the paper's figure in its own column."""
    t4 = summary['table4']
    teachers = summary['teachers']
    lines = [
        '# The distillation findings of DeiT (section 5), reproduced at small scale on DIGITS', '',
        '## What made this report', '',
        *[f'- {key}: `{value}`' for key, value in made.items()], '',
        f'## Setting ({setting["name"]})', '', *[f'- {line}' for line in setting['description']], '',
        'Figures are mean ± standard deviation over seeds (sample std), with the number of runs; the paper\'s '
        'figures are ImageNet top-1 of DeiT-B (300 epochs): they sit beside ours for the direction of each effect, '
        'not its size. T2 / T4 / T5: the paper\'s Tables 2, 4 and 5.', '',
        '## Teachers', '', '| teacher | model | epochs | top-1 (%), ours | paper |', '|---|---|---|---|---|',
        *[f'| {t} | {v["model"]} | {v["epochs"]} | {v["acc1"]:.1f} | {PAPER_TEACHERS[t]} |'
          for t, v in teachers.items()], '',
        '## Accuracy of each variant and head (Table 5, Table 2)', '', *_accuracy_rows(summary), '',
        '## Class and distillation tokens (section 5.1)', '',
        'Cosine similarity of the class token and the distillation token (the second class token for the '
        'control): of the learned parameters, and of their outputs after the last block (mean over the val '
        'images); token_cosines.png shows every block.', '', *_token_rows(summary), '',
        '## Disagreement between classifiers (Table 4)', '',
        'Fraction of the val images on which two classifiers\' top-1 differ. Ours (mean ± std over seeds; the '
        'student is the hard-distilled one of the convnet teacher):', '',
        *_matrix_rows(t4['names'], [[f'{m:.3f} ± {s:.3f}' for m, s in zip(mr, sr)]
                                    for mr, sr in zip(t4['mean'], t4['std'])]), '',
        'The paper\'s (ImageNet val, DeiT-B, RegNetY-16GF teacher):', '',
        *_matrix_rows(t4['names'], [[f'{v:.3f}' for v in row] for row in t4['paper']]), '',
        'Every student head against each teacher:', '', *_agreement_rows(summary), '',
        '## The claims', '',
        'Each claim is a paired comparison over seeds (same seed, a - b). Verdict: "holds" when the mean '
        'difference has the claimed sign and exceeds two standard errors (for "no better" claims: when it does '
        'not exceed them); "not shown" when it lies within; "reversed" when it exceeds them the other way.', '',
        *_claim_rows(found), '',
        '## Figures', '',
        '- accuracy.png: top-1 per variant and head; training_curves.png: test top-1 and train loss per epoch; '
        'token_cosines.png: cosine of the two tokens per block; disagreement.png: Table 4, ours and the paper\'s.',
        '', '## Time', '', *_timing_rows(measured), '',
    ]
    return '\n'.join(lines)


def write(out: Path, made: Dict[str, Any], setting: Dict[str, Any], measured: Dict[str, Any],
          agreement: Dict[str, Any]) -> None:
    """results.json, the figures and report.md in ``out``."""
    seeds = per_seed(measured, agreement)
    summary = summarise(measured, seeds)
    found = claims(seeds)
    results = {'made': made, 'setting': setting, 'summary': summary, 'claims': found, 'per_seed': seeds,
               'runs': {name: {k: v for k, v in r.items() if k not in ('predictions', 'log')}
                        for name, r in measured['runs'].items()}}
    (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    for name, plot in FIGURES.items():
        plot(summary, out / name)
    plot_curves(measured, out / 'training_curves.png')
    (out / 'report.md').write_text(markdown(made, setting, summary, found, measured))

# ============ the probe ============


def write_probe(out: Path, made: Dict[str, Any], probe: Dict[str, Any]) -> None:
    """results.json and report.md of the probe runs: every run's curve on the probe split, and the lengths chosen."""
    (out / 'results.json').write_text(json.dumps({'made': made, **probe}, indent=2) + '\n')
    lines = ['# The probe: the lengths of reproduce.py\'s runs, chosen on the probe split', '',
             '## What made this report', '', *[f'- {key}: `{value}`' for key, value in made.items()], '',
             '## The rule', '',
             f'Fixed in reproduce.py before any probe ran: {probe["rule"]}. Each probe run trains on the training '
             'pool (half of each digit\'s training scans, the images of the claims grid) with the recipe of the '
             'grid, and is scored on the probe split (reproduce_data.py), which no grid run trains or tests on.', '',
             '## Runs', '', '| run | model | epochs | seed | probe top-1 (%) at the end |', '|---|---|---|---|---|',
             *[f'| {r["name"]} | {r["model"]} | {r["epochs"]} | {r["seed"]} | {r["final"]:.1f} |'
               for r in probe['runs']], '', '## Choices', '']
    for kind, choice in probe['choices'].items():
        means = ', '.join(f'{e} epochs: {m:.1f}' for e, m in choice['means'].items())
        lines.append(f'- {kind} ({probe["models"][kind]}): mean probe top-1 {means} -> **{choice["epochs"]} epochs**'
                     + ('' if choice['converged'] else ' (convergence not shown: the longest length probed)'))
    (out / 'report.md').write_text('\n'.join(lines) + '\n')
