"""The figures of reproduce.py's reports, drawn by matplotlib's Agg backend (imported only when a figure is drawn);
one function per figure, each a pure function of reproduce_report's summaries."""
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from figures import figure

LABELS = {'none': 'no distillation', 'soft_convnet': 'soft,\nconvnet teacher', 'hard_convnet': 'hard,\nconvnet teacher',
          'hard_transformer': 'hard,\ntransformer teacher', 'two_class_tokens': 'control:\ntwo class tokens',
          'teacher_convnet': 'convnet\nteacher', 'teacher_transformer': 'transformer\nteacher'}
HEAD_NAMES = {'cls': 'class head', 'dist': 'distillation head', 'avg': 'average of both'}

Table = Dict[str, Dict[int, Dict[str, Any]]]  # variant -> seed -> run record


def accuracy(table: Table, teachers: Dict[str, Any], out: Path) -> None:
    """Test top-1 of every variant and head: each seed a dot, the mean a bar; the teachers too."""
    fig = figure(10, 4.4, 100)
    ax = fig.subplots()
    variants = list(table)
    for i, head in enumerate(('cls', 'dist', 'avg')):
        for j, variant in enumerate(variants):
            values = [r['final'][head] for r in table[variant].values() if head in r['final']]
            if not values:
                continue
            x = j + (i - 1) * 0.27
            ax.bar(x, np.mean(values), 0.27, color=f'C{i}', alpha=0.6, label=HEAD_NAMES[head] if j == 3 else None)
            ax.plot([x] * len(values), values, 'k.', markersize=3)
    ax.set_xticks(range(len(variants)), [LABELS.get(v, v) for v in variants], fontsize=7)
    ax.set_ylabel('top-1 accuracy on the test images (%)')
    lows = [r['final']['avg'] for seeds in table.values() for r in seeds.values()]
    ax.set_ylim(max(0.0, min(lows) - 5), 100)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles, names, fontsize=7, loc='lower right')
    ax.set_title('each dot a seed, each bar the mean (teachers: their only head)', fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


def curves(table: Table, out: Path) -> None:
    """Test top-1 per evaluated epoch of every run, one panel per kind of run, the mean over seeds in black."""
    variants = list(table)
    columns = 4
    rows = -(-len(variants) // columns)
    fig = figure(4 * columns, 3.2 * rows, 100)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, variant in zip(axes, variants):
        runs = list(table[variant].values())
        for r in runs:
            epochs, acc = zip(*r['curve'])
            ax.plot(epochs, acc, linewidth=0.8, alpha=0.6)
        length = min(len(r['curve']) for r in runs)
        mean = np.mean([[a for _, a in r['curve'][:length]] for r in runs], axis=0)
        ax.plot([e for e, _ in runs[0]['curve'][:length]], mean, 'k', linewidth=1.6, label='mean')
        ax.set_title(LABELS.get(variant, variant).replace('\n', ' '), fontsize=9)
        ax.set_xlabel('epoch')
        ax.set_ylabel('test top-1 (%)')
        ax.set_ylim(0, 100)
    for ax in axes[len(variants):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(out)


def token_cosines(tokens: Dict[str, Dict[str, Any]], out: Path) -> None:
    """Cosine of the class and distillation tokens: learned (x = 0), then the output of each block, before (left) and
    after (right) the final norm; mean and std over seeds."""
    fig = figure(11, 4, 100)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], 'blocks', 'block outputs'), (axes[1], 'blocks_normed',
                                                                    'block outputs after the final norm')):
        for i, (variant, t) in enumerate(tokens.items()):
            mean = np.asarray([t['cos_end']['mean'], *t[f'{key}_mean']])
            std = np.asarray([t['cos_end']['std'], *t[f'{key}_std']])
            x = np.arange(len(mean))
            ax.plot(x, mean, marker='o', markersize=3, color=f'C{i}', label=LABELS[variant].replace('\n', ' '))
            ax.fill_between(x, mean - std, mean + std, color=f'C{i}', alpha=0.15)
        ax.axhline(0.93, color='k', linestyle=':', linewidth=1, label='paper: 0.93 after the last block')
        ax.axhline(0.06, color='k', linestyle='--', linewidth=1, label='paper: 0.06 between the learned tokens')
        ax.set_xlabel('block (0: the learned tokens, i: the output of block i)')
        ax.set_ylabel('cosine (class, distillation token)')
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)


def disagreement(t4: Dict[str, Any], out: Path) -> None:
    """Table 4: ours (mean over seeds) beside the paper's, as two heat maps with their figures."""
    fig = figure(11, 4.6, 100)
    axes = fig.subplots(1, 2)
    names = t4['names']
    for ax, matrix, title in zip(axes, (t4['mean'], t4['paper']),
                                 ('ours (DIGITS test images, mean over seeds)', 'paper (ImageNet val, Table 4)')):
        image = ax.imshow(matrix, cmap='viridis', vmin=0)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f'{value:.3f}', ha='center', va='center', fontsize=7, color='w')
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label='fraction of images classified differently')
    fig.tight_layout()
    fig.savefig(out)


def sweep(judged: List[Dict[str, Any]], per_fraction: Dict[str, Dict[str, Any]], out: Path) -> None:
    """Gain of hard distillation over none (mean, 95% CI) against training images per class, per teacher kind;
    beside it, the accuracy of each kind of run."""
    fig = figure(11, 4.2, 100)
    gain_ax, acc_ax = fig.subplots(1, 2)
    for i, label in enumerate(('hard (convnet) - none', 'hard (transformer) - none')):
        points = [c for c in judged if c['label'] == label]
        x = np.asarray([c['images_per_class'] for c in points])
        y = np.asarray([c['mean'] for c in points])
        low = np.asarray([c['ci95'][0] if c['ci95'] else c['mean'] for c in points])
        high = np.asarray([c['ci95'][1] if c['ci95'] else c['mean'] for c in points])
        gain_ax.errorbar(x * (1 + 0.03 * (2 * i - 1)), y, yerr=[y - low, high - y], marker='o', capsize=4,
                         color=f'C{i}', label=label.replace(' - none', ''))
    gain_ax.axhline(0, color='k', linewidth=0.8)
    gain_ax.set_xscale('log', base=2)
    gain_ax.set_xlabel('training images per class')
    gain_ax.set_ylabel('gain over no distillation (points of top-1, 95% CI)')
    gain_ax.legend(fontsize=8)
    for i, variant in enumerate(('none', 'hard_convnet', 'hard_transformer', 'teacher_convnet')):
        x = [f['sizes']['train'] / 10 for f in per_fraction.values()]
        y = [f['accuracy'][variant]['avg']['test']['mean'] for f in per_fraction.values()]
        s = [f['accuracy'][variant]['avg']['test']['std'] for f in per_fraction.values()]
        acc_ax.errorbar(x, y, yerr=s, marker='o', capsize=3, color=f'C{i}', label=LABELS[variant].replace('\n', ' '),
                        linestyle='--' if variant.startswith('teacher') else '-')
    acc_ax.set_xscale('log', base=2)
    acc_ax.set_xlabel('training images per class')
    acc_ax.set_ylabel('test top-1 (%, mean ± std over seeds)')
    acc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
