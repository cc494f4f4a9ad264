"""reproduce.py's report: the claims judged over seeds (verdicts.py), the paper's figures beside ours, the figures
(reproduce_figures.py) and report.md / results.json. Pure functions of what reproduce.py measured."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import reproduce_figures
import verdicts

HEADS = ('cls', 'dist', 'avg')
HEAD_NAMES = {'cls': 'class head', 'dist': 'distillation head', 'avg': 'average of both'}
VARIANT_NAMES = {
    'none': 'DeiT-Ti, no distillation',
    'soft_convnet': 'DeiT-Ti distilled, soft, convnet teacher',
    'hard_convnet': 'DeiT-Ti distilled, hard, convnet teacher',
    'hard_transformer': 'DeiT-Ti distilled, hard, transformer teacher',
    'two_class_tokens': 'control: second class token (--dist-head-on-labels)',
    'teacher_convnet': 'convnet teacher', 'teacher_transformer': 'transformer teacher',
}

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

# ============ rules fixed before the runs ============

# A run's curve is flat when the mean over seeds gains less than CONVERGED_GAIN points of test top-1 over the last
# CONVERGED_TAIL of its epochs.
CONVERGED_GAIN, CONVERGED_TAIL = 1.0, 0.2
# A run ending more than UNSTABLE_POINTS below the median of its variant is listed as unstable, with its best epoch.
UNSTABLE_POINTS = 10.0
# The claims whose power sets the number of seeds: they should detect HEADLINE_DELTA points at 80% power.
HEADLINE_DELTA = 2.0

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


def by_seed(runs: List[Dict[str, Any]]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """variant -> student seed -> run record, for the runs of one grid (one training fraction); a teacher is filed
    under the seed of the students it teaches."""
    table: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for r in runs:
        seed = int(r['name'].rsplit('/seed', 1)[1])
        table.setdefault(r['variant'], {})[seed] = r
    return table


def complete_seeds(table: Dict[str, Dict[int, Dict[str, Any]]]) -> List[int]:
    """The seeds every variant of the table has (the student seeds; a teacher is filed under its student's seed)."""
    return sorted(set.intersection(*(set(seeds) for seeds in table.values())))


def disagreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of test images on which two classifiers' top-1 differ (analyze.disagreement, on lists)."""
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def convergence(table: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per variant: the mean curve's gain over the last CONVERGED_TAIL of the epochs, and whether it is flat."""
    result = {}
    for variant, seeds in table.items():
        curves = [r['curve'] for r in seeds.values()]
        epochs = min(len(c) for c in curves)
        mean = np.mean([[acc for _, acc in c[:epochs]] for c in curves], axis=0)
        at = [e for e, _ in curves[0][:epochs]]
        last = at[-1]
        start = max(i for i, e in enumerate(at) if e <= (1 - CONVERGED_TAIL) * last) if at[0] < last else 0
        gain = float(mean[-1] - mean[start])
        result[variant] = {'from_epoch': at[start], 'to_epoch': last, 'gain': gain, 'flat': gain < CONVERGED_GAIN}
    return result


def unstable(table: Dict[str, Dict[int, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The runs ending UNSTABLE_POINTS or more below their variant's median, with their best test top-1 on the way."""
    found = []
    for variant, seeds in table.items():
        median = float(np.median([r['final']['avg'] for r in seeds.values()]))
        for seed, r in seeds.items():
            if r['final']['avg'] <= median - UNSTABLE_POINTS:
                best = max(r['curve'], key=lambda point: point[1])
                found.append({'variant': variant, 'seed': seed, 'final': r['final']['avg'], 'median': median,
                              'best': best[1], 'best_epoch': best[0]})
    return found

# ============ the claims ============


def grid_claims(table: Dict[str, Dict[int, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The paper's section 5 claims, each a paired comparison over the seeds every variant has: claim, paper, the
    per-seed values a and b, the margin of an equivalence claim (None for a directional one), unit, headline."""
    seeds = complete_seeds(table)

    def acc(variant: str, head: str = 'avg') -> List[float]:
        return [table[variant][s]['final'][head] for s in seeds]

    def agree(variant: str, head: str, teacher: str = 'teacher_convnet') -> List[float]:
        return [disagreement(table[variant][s]['predictions'][head], table[teacher][s]['predictions']['avg'])
                for s in seeds]

    def tokens(variant: str, key: str, index: Optional[int] = None) -> List[float]:
        values = [table[variant][s]['tokens'][key] for s in seeds]
        return [v[index] for v in values] if index is not None else values

    margin = verdicts.MARGIN
    spec = [
        ('hard distillation beats none (convnet teacher, both heads)', '83.4 vs 81.8 (T5)', 'hard - none',
         acc('hard_convnet'), acc('none'), None, 'points', True),
        ('hard distillation beats soft (convnet teacher, both heads)', '83.4 vs 81.8 (T5)', 'hard - soft',
         acc('hard_convnet'), acc('soft_convnet'), None, 'points', True),
        ('a convnet teacher beats a transformer teacher (hard, both heads)', '82.7 vs 81.9 (T2)',
         'convnet - transformer teacher', acc('hard_convnet'), acc('hard_transformer'), None, 'points', True),
        ('soft distillation is no better than none', '81.8 vs 81.8 (T5)', 'soft - none', acc('soft_convnet'),
         acc('none'), margin, 'points', False),
        ('the control (a second class token) gains nothing over none', 'no gain (text)', 'control - none',
         acc('two_class_tokens'), acc('none'), margin, 'points', False),
        ('hard distillation beats the control', '83.4 vs no gain (T5, text)', 'hard - control', acc('hard_convnet'),
         acc('two_class_tokens'), None, 'points', False),
        ('the heads are complementary: their average beats the class head (hard, convnet)', '83.4 vs 83.0 (T5)',
         'avg - cls', acc('hard_convnet'), acc('hard_convnet', 'cls'), None, 'points', False),
        ('... and the distillation head', '83.4 vs 83.1 (T5)', 'avg - dist', acc('hard_convnet'),
         acc('hard_convnet', 'dist'), None, 'points', False),
        ('the distillation head is as accurate as the class head', '83.1 vs 83.0 (T5)', 'dist - cls',
         acc('hard_convnet', 'dist'), acc('hard_convnet', 'cls'), margin, 'points', False),
        ('a distilled student agrees more with the convnet teacher than DeiT without distillation (disagreement, '
         'none vs hard student)', '0.133 vs 0.102 (T4)', 'none - hard', agree('none', 'avg'),
         agree('hard_convnet', 'avg'), None, '', False),
        ('the distillation head agrees more with the convnet teacher than the class head (disagreement, class vs '
         'distillation head)', '0.112 vs 0.100 (T4)', 'cls - dist', agree('hard_convnet', 'cls'),
         agree('hard_convnet', 'dist'), None, '', False),
        ('two class tokens end closer than a class and a distillation token (cosine of the learned tokens)',
         '0.999 vs 0.06 (text)', 'control - hard', tokens('two_class_tokens', 'cos_end'),
         tokens('hard_convnet', 'cos_end'), None, '', False),
        ('... and after the last block and the final norm (cosine of the outputs the heads read)',
         'quasi-identical vs 0.93 (text)', 'control - hard', tokens('two_class_tokens', 'blocks_normed', -1),
         tokens('hard_convnet', 'blocks_normed', -1), None, '', False),
    ]
    return [{'claim': text, 'paper': paper, 'label': label, 'a': a, 'b': b, 'seeds': seeds, 'margin': m,
             'unit': unit, 'headline': headline} for text, paper, label, a, b, m, unit, headline in spec]


def sweep_claims(tables: Dict[float, Dict[str, Dict[int, Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """At each training fraction: the gain of hard distillation over none from each teacher, and convnet against
    transformer teacher."""
    found = []
    for fraction, table in tables.items():
        seeds = complete_seeds(table)
        acc = {v: [table[v][s]['final']['avg'] for s in seeds] for v in table}
        images = table['none'][seeds[0]]['train_images']
        for label, a, b, paper in (('hard (convnet) - none', 'hard_convnet', 'none', '83.4 vs 81.8 (T5)'),
                                   ('hard (transformer) - none', 'hard_transformer', 'none', '81.9 vs 81.8 (T2, T5)'),
                                   ('convnet - transformer teacher', 'hard_convnet', 'hard_transformer',
                                    '82.7 vs 81.9 (T2)')):
            found.append({'claim': f'{label}, {images} training images ({images // 10} per class)', 'paper': paper,
                          'label': label, 'a': acc[a], 'b': acc[b], 'seeds': seeds, 'margin': None, 'unit': 'points',
                          'headline': False, 'fraction': fraction, 'images_per_class': images / 10})
    return found


def judge(found: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each claim with its per-seed differences and its judgement (verdicts.judge: Holm over the whole list)."""
    differences = [list(np.asarray(c['a'], dtype=float) - np.asarray(c['b'], dtype=float)) for c in found]
    judged = verdicts.judge([(d, c['margin']) for d, c in zip(differences, found)])
    result = []
    for c, d, j in zip(found, differences, judged):
        digits = 1 if c['unit'] == 'points' else 3
        record = {**c, 'differences': d, **j.to_dict(), 'line': verdicts.line(j, c['label'], c['unit'], digits)}
        if c['headline'] and j.stat.sd:
            record['seeds_for_2_points'] = verdicts.seeds_needed(j.stat.sd, HEADLINE_DELTA)
        result.append(record)
    return result

# ============ summaries ============


def accuracy_summary(table: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """variant -> head -> {'test': mean_std on all test images, 'val': on DIGITS' 355 val scans}."""
    return {v: {h: {'test': mean_std([r['final'][h] for r in seeds.values()]),
                    'val': mean_std([r['final_val'][h] for r in seeds.values()])}
                for h in next(iter(seeds.values()))['final']}
            for v, seeds in table.items()}


def table4(table: Dict[str, Dict[int, Dict[str, Any]]], labels: Sequence[int]) -> Dict[str, Any]:
    """The paper's Table 4 per seed (the student and the plain DeiT of seed k, with the convnet teacher of seed k),
    and its mean and std over seeds."""
    matrices = []
    for s in complete_seeds(table):
        hard = table['hard_convnet'][s]['predictions']
        rows = [labels, table['teacher_convnet'][s]['predictions']['avg'], table['none'][s]['predictions']['avg'],
                hard['cls'], hard['dist'], hard['avg']]
        matrices.append([[disagreement(a, b) for b in rows] for a in rows])
    m = np.asarray(matrices)
    return {'names': TABLE4_NAMES, 'per_seed': matrices, 'mean': m.mean(0).tolist(),
            'std': (m.std(0, ddof=1) if len(m) > 1 else 0 * m[0]).tolist(), 'paper': PAPER_TABLE4}


def token_summary(table: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per distilled variant: cosine of the learned tokens at initialisation and at the end, how far each moved, and
    the cosine of their outputs per block before and after the final norm (mean and std over seeds)."""
    result = {}
    for variant, seeds in table.items():
        t = [r['tokens'] for r in seeds.values() if r.get('tokens')]
        if not t:
            continue
        blocks, normed = np.asarray([x['blocks'] for x in t]), np.asarray([x['blocks_normed'] for x in t])
        result[variant] = {
            **{k: mean_std([x[k] for x in t]) for k in ('cos_init', 'cos_end', 'moved_cls', 'moved_dist')},
            'last_block': mean_std(blocks[:, -1]), 'last_block_normed': mean_std(normed[:, -1]),
            'blocks_mean': blocks.mean(0).tolist(), 'blocks_normed_mean': normed.mean(0).tolist(),
            'blocks_std': (blocks.std(0, ddof=1) if len(t) > 1 else 0 * blocks[0]).tolist(),
            'blocks_normed_std': (normed.std(0, ddof=1) if len(t) > 1 else 0 * normed[0]).tolist()}
    return result


def teacher_summary(table: Dict[str, Dict[int, Dict[str, Any]]], runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The teachers of the students of each seed, over seeds, and the gaps paired by student seed: convnet -
    transformer teacher, convnet teacher - plain student. The transformer teacher of seed k is a plain DeiT-Ti run
    (reproduce.teacher_of), found in ``runs`` by the name the hard-distilled student recorded."""
    seeds = complete_seeds(table)
    by_name = {r['name']: r for r in runs}
    teachers = {'convnet': [table['teacher_convnet'][s] for s in seeds],
                'transformer': [by_name[table['hard_transformer'][s]['teacher']] for s in seeds]}

    def acc(records: List[Dict[str, Any]], key: str = 'final') -> np.ndarray:
        return np.asarray([r[key]['avg'] for r in records])

    gaps = {'convnet - transformer teacher': acc(teachers['convnet']) - acc(teachers['transformer']),
            'convnet teacher - plain student (none)': acc(teachers['convnet']) - acc([table['none'][s] for s in seeds])}
    return {'teachers': {t: {'model': r[0]['model'], 'epochs': r[0]['epochs'], 'test': mean_std(acc(r)),
                             'val': mean_std(acc(r, 'final_val')), 'seeds': [x['seed'] for x in r]}
                         for t, r in teachers.items()},
            'gaps': {name: verdicts.paired(list(g)).to_dict() for name, g in gaps.items()}}

# ============ report.md ============


def describe(setting: Dict[str, Any], sizes: Dict[str, int], probe: Dict[str, str]) -> List[str]:
    """The setting, one line per choice, each with what chose it."""
    per_class = sizes['train'] // 10
    return [
        f'Data: DIGITS (real 8x8 scans of handwritten digits). Training: {sizes["train"]} images '
        f'({setting["fraction"]:g} of each digit\'s training scans, about {per_class} per class), a data-poor regime '
        'on purpose: the paper\'s point is that a transformer, which lacks a convnet\'s inductive biases, learns '
        'them from a convnet teacher when data alone does not teach them (ImageNet has about 1,300 images per '
        'class). Test: DIGITS\' '
        f'{sizes["val"]} validation scans and the {sizes["heldout"]} training scans that no run trains on and no '
        f'choice looked at ({sizes["val"] + sizes["heldout"]} in all; both figures are given). Settings were '
        f'chosen on the {sizes["probe"]} scans of the probe split (reproduce_data.py).',
        f'Input {setting["input_size"]}x{setting["input_size"]}: the 8x8 scans upscaled 4x, 2x2 patches of 16 pixels '
        'for DeiT-Ti, and main.py\'s recipe for small inputs (a padded random crop instead of RandomResizedCrop).',
        'Recipe: main.py\'s defaults, the paper\'s Table 9 (AdamW, weight decay 0.05, cosine schedule, label '
        'smoothing 0.1, RandAugment, random erasing 0.25, Mixup 0.8, CutMix 1.0, stochastic depth 0.1), batch '
        f'{setting["batch_size"]}, {setting["warmup_epochs"]} warm-up epochs, except: lr {setting["lr"]:g} per step '
        'unscaled (the paper\'s value for its batch of 512), and no weight EMA (the paper found it of little help, '
        'its Table 8). Distillation: --distillation-alpha 0.5, --distillation-tau 1.0 (the paper\'s).',
        f'Length: {setting["student_epochs"]} epochs for every student and for the transformer teachers '
        f'({probe["student"]}); {setting["convnet_epochs"]} epochs for the convnet teachers ({probe["convnet"]}). A '
        'run at another training fraction keeps the number of optimizer steps (more epochs of fewer images).',
        'Teachers: student seed k learns from the convnet teacher of seed k (trained with seed 1000 + k) and, as its '
        'transformer teacher, from the plain DeiT-Ti of seed k + 1 (cyclically): a DeiT-Ti with the students\' '
        'recipe and length, as the paper\'s DeiT-B teacher of DeiT-B students, trained once for both uses. Each '
        'student has teachers of its own, so that a claim about teachers holds over teachers, not over one model of '
        'each kind; the teacher of a hard-distilled student is never the baseline it is compared with (the plain '
        'DeiT-Ti of its own seed). A plain run teaching the previous seed\'s student makes neighbouring differences '
        '"hard (transformer) - none" slightly anti-correlated, which widens their interval: conservative.',
        'Every head is measured on the final weights (not the best epoch\'s, which would select on the test images). '
        f'Training curves are evaluated every {setting["eval_every"]} epochs (main.py --eval-every).',
    ]


def _claim_rows(judged: List[Dict[str, Any]]) -> List[str]:
    rows = ['| claim | paper | ours: a vs b (n) | a - b, 95% CI | p | verdict | after Holm (p) '
            '| detectable at 80% power |', '|---|---|---|---|---|---|---|---|']
    for c in judged:
        d = 1 if c['unit'] == 'points' else 3
        a, b = np.mean(c['a']), np.mean(c['b'])
        ci = f'[{c["ci95"][0]:.{d}f}, {c["ci95"][1]:.{d}f}]' if c['ci95'] else c['note']
        margin = f'; 90% CI [{c["ci90"][0]:.{d}f}, {c["ci90"][1]:.{d}f}] vs ±{c["margin"]:g}' if (
            c['margin'] is not None and c['ci90']) else ''
        p = '—' if c['p'] is None else f'{c["p"]:.3f}'
        if c['margin'] is not None and c['p_equivalence'] is not None:
            p += f' (equiv. {c["p_equivalence"]:.3f})'
        holm = '—' if c['p_holm'] is None else f'{c["p_holm"]:.3f}'
        if c['margin'] is not None and c['p_equivalence_holm'] is not None:
            holm += f', equiv. {c["p_equivalence_holm"]:.3f}'
        mdd = '—' if c['mdd'] is None else f'{c["mdd"]:.{d}f}'
        rows.append(f'| {c["claim"]} | {c["paper"]} | {a:.{d}f} vs {b:.{d}f} ({c["n"]}) | {c["mean"]:+.{d}f} {ci}'
                    f'{margin} | {p} | **{c["verdict"]}** | **{c["verdict_holm"]}** ({holm}) | {mdd} |')
    return rows


def _accuracy_rows(summary: Dict[str, Dict[str, Dict[str, Any]]], n_test: int, n_val: int) -> List[str]:
    rows = [f'| variant | head | runs | top-1 (%), {n_test} test images | on the {n_val} val scans | paper |',
            '|---|---|---|---|---|---|']
    for variant, heads in summary.items():
        for head, stat in heads.items():
            shown = head if len(heads) > 1 else 'the only head'
            rows.append(f'| {VARIANT_NAMES[variant]} | {shown} | {stat["test"]["n"]} | {fmt(stat["test"])} | '
                        f'{fmt(stat["val"])} | {PAPER_ACCURACY.get((variant, head), "—")} |')
    return rows


def _token_rows(tokens: Dict[str, Dict[str, Any]]) -> List[str]:
    rows = ['| variant | runs | learned tokens at init | at the end | paper | moved: class token | distillation token '
            '| after the last block | after it and the final norm | paper |', '|---' * 10 + '|']
    for variant, t in tokens.items():
        paper = PAPER_TOKENS.get(variant, ('—', '—'))
        rows.append(f'| {VARIANT_NAMES[variant]} | {t["cos_end"]["n"]} | {fmt(t["cos_init"], 3)} | '
                    f'{fmt(t["cos_end"], 3)} | {paper[0]} | {fmt(t["moved_cls"], 3)} | {fmt(t["moved_dist"], 3)} | '
                    f'{fmt(t["last_block"], 3)} | {fmt(t["last_block_normed"], 3)} | {paper[1]} |')
    return rows


def _matrix_rows(names: List[str], cells: List[List[str]]) -> List[str]:
    return ([f'| | {" | ".join(names)} |', '|---' * (len(names) + 1) + '|']
            + [f'| {name} | {" | ".join(row)} |' for name, row in zip(names, cells)])


def _convergence_rows(found: Dict[str, Dict[str, Any]]) -> List[str]:
    rows = ['| runs of | epochs | mean test top-1 gained over the last 20% of epochs | flat? |', '|---|---|---|---|']
    for variant, c in found.items():
        rows.append(f'| {VARIANT_NAMES.get(variant, variant)} | {c["from_epoch"]} -> {c["to_epoch"]} | '
                    f'{c["gain"]:+.2f} | {"yes" if c["flat"] else "**no**"} |')
    return rows


def _stability_rows(table: Dict[str, Dict[int, Dict[str, Any]]], found: List[Dict[str, Any]]) -> List[str]:
    rows = ['| variant | final top-1 of each seed (%) |', '|---|---|']
    for variant, seeds in table.items():
        finals = ', '.join(f'{r["final"]["avg"]:.1f}' for _, r in sorted(seeds.items()))
        rows.append(f'| {VARIANT_NAMES.get(variant, variant)} | {finals} |')
    rows.append('')
    if not found:
        rows.append(f'No run ended {UNSTABLE_POINTS:g} points or more below the median of its variant.')
    for u in found:
        rows.append(f'- {VARIANT_NAMES.get(u["variant"], u["variant"])}, seed {u["seed"]}: {u["final"]:.1f} at the '
                    f'end, {u["median"] - u["final"]:.1f} below the median; its best evaluated epoch was '
                    f'{u["best_epoch"]} at {u["best"]:.1f}'
                    + (' (it learned, then lost it: a divergence)' if u['best'] > u['median'] - 5
                       else ' (it never reached its variant\'s level)'))
    return rows


def _timing_rows(runs: List[Dict[str, Any]], split: Optional[Dict[str, Any]]) -> List[str]:
    """Wall and CPU time per kind of run, where it went, and --time-split's before / after."""
    kinds: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        kinds.setdefault(r['variant'], []).append(r)
    rows = ['| runs of | count | epochs | optimizer steps | wall time per run | CPU time per run |',
            '|---|---|---|---|---|---|']
    for kind, rs in kinds.items():
        rows.append(f'| {VARIANT_NAMES.get(kind, kind)} | {len(rs)} | {rs[0]["epochs"]} | {rs[0]["steps"]} | '
                    f'{duration(np.mean([r["done"]["wall_s"] for r in rs]))} | '
                    f'{duration(np.mean([r["done"]["cpu_s"] for r in rs]))} |')
    cpu = sum(r['done']['cpu_s'] for r in runs)
    rows += ['', f'All runs together used {duration(cpu)} of CPU time (user + system, one thread per run). On an idle '
             f'machine with C cores running C runs side by side that takes about the CPU time divided by C: '
             f'{duration(cpu / 2)} on 2 cores.']
    splits = [r['done']['split'] for r in runs if r['done'].get('split')]
    if splits:
        total = sum(s['total'] for s in splits)
        rows += ['', 'Where the wall time of these runs went (reproduce_grid.Timers, summed over the runs):', '',
                 '| part | share |', '|---|---|',
                 *[f'| {part} | {sum(s[part] for s in splits) / total:.1%} |' for part in SPLIT_PARTS]]
    if split:
        before, after = split['before'], split['after']
        rows += ['', f'Before and after (`python reproduce.py --time-split`): {split["epochs"]} epochs of '
                 f'{split["run"]}, run as reproduce.py ran its runs before (a new interpreter each, evaluated after '
                 f'every epoch) and as it runs them now (a fork of reproduce.py, evaluated every '
                 f'{split["eval_every"]} epochs), one after '
                 'the other on the same machine. Seconds of wall time:', '',
                 '| part | before | after |', '|---|---|---|',
                 *[f'| {part} | {before[part]:.1f} | {after[part]:.1f} |' for part in (*SPLIT_PARTS, 'total')]]
    return rows


SPLIT_PARTS = ('start-up', 'data', 'training step', 'teacher', 'evaluation', 'checkpoints', 'other')


def markdown(made: Dict[str, Any], setting: Dict[str, Any], r: Dict[str, Any]) -> str:
    """report.md of the claims grid: what made it, the setting, the verdicts, then every table."""
    t4 = r['table4']
    teachers = r['teachers']
    headline = [c for c in r['claims'] if c['headline']]
    lines = [
        '# The distillation findings of DeiT (section 5), reproduced at small scale on DIGITS', '',
        '## What made this report', '', *[f'- {key}: `{value}`' for key, value in made.items()], '',
        '## Setting', '', *[f'- {line}' for line in setting['description']], '',
        'Figures are mean ± standard deviation over seeds (sample std), with the number of runs; the paper\'s '
        'figures are ImageNet top-1 of DeiT-B (300 epochs): they sit beside ours for the direction of each effect, '
        'not its size. T2 / T4 / T5: the paper\'s Tables 2, 4 and 5.', '',
        '## The claims', '',
        'Each claim is a paired comparison over seeds (a and b of the same seed, and the same teachers), judged by '
        'verdicts.py with rules fixed before the runs: a directional claim ("a beats b") holds when the 95% '
        't-interval of the mean difference lies above 0 and is reversed when it lies below; an equivalence claim '
        f'("no better", "no gain", "as accurate") holds when its 90% interval lies inside ±{verdicts.MARGIN:g} points '
        '(two one-sided tests), and is "better" or "worse" when the 95% interval excludes 0; anything else is "not '
        'shown". Holm\'s correction runs over every null hypothesis a verdict rejects (one per directional claim, two '
        'per equivalence claim). "Detectable" is the smallest true difference the test finds with 80% power at the '
        'spread observed.', '',
        *_claim_rows(r['claims']), '',
        *[f'- {c["claim"]}: {c["line"]}' for c in r['claims']], '',
        *[f'- Seeds needed to detect {HEADLINE_DELTA:g} points at 80% power in "{c["claim"]}", at its spread: '
          f'{c.get("seeds_for_2_points", "—")} (this grid: {c["n"]}).' for c in headline], '',
        '## Convergence', '',
        f'Rule, fixed before the runs: a kind of run is flat when its mean test curve gains less than '
        f'{CONVERGED_GAIN:g} point over the last {CONVERGED_TAIL:.0%} of its epochs. (The cosine schedule flattens '
        'every curve at its end; the lengths themselves were chosen by the probe, which doubles a length to see '
        'whether it still gains.)', '', *_convergence_rows(r['convergence']), '',
        '## Teachers', '',
        '| teacher | model | epochs | runs | top-1 (%), test | val | paper |', '|---|---|---|---|---|---|---|',
        *[f'| {t} | {v["model"]} | {v["epochs"]} | {v["test"]["n"]} | {fmt(v["test"])} | {fmt(v["val"])} | '
          f'{PAPER_TEACHERS[t]} |' for t, v in teachers['teachers'].items()], '',
        *[f'- {name}, paired by seed: {g["mean"]:+.1f} points'
          + (f', 95% CI [{g["ci95"][0]:.1f}, {g["ci95"][1]:.1f}]' if g['ci95'] else '')
          for name, g in teachers['gaps'].items()], '',
        '## Accuracy of each variant and head (Table 5, Table 2)', '',
        *_accuracy_rows(r['accuracy'], r['sizes']['test'], r['sizes']['val']), '',
        '## Class and distillation tokens (section 5.1)', '',
        'Cosine similarity of the class token and the distillation token (the second class token for the '
        'control): of the learned parameters at initialisation and at the end, how far each token moved '
        '(||end - init|| / ||init||), and of their outputs after the last block, before and after the final norm '
        '(mean over the test images; the heads read the normed outputs). token_cosines.png shows every block.', '',
        *_token_rows(r['tokens']), '',
        '## Disagreement between classifiers (Table 4)', '',
        'Fraction of the test images on which two classifiers\' top-1 differ, mean ± std over seeds: the '
        'hard-distilled student of the convnet teacher and the plain DeiT-Ti of seed k, with the convnet teacher of '
        'seed k.', '',
        *_matrix_rows(t4['names'], [[f'{m:.3f} ± {s:.3f}' for m, s in zip(mr, sr)]
                                    for mr, sr in zip(t4['mean'], t4['std'])]), '',
        'The paper\'s (ImageNet val, DeiT-B, RegNetY-16GF teacher):', '',
        *_matrix_rows(t4['names'], [[f'{v:.3f}' for v in row] for row in t4['paper']]), '',
        '## Stability', '', *_stability_rows(r['table'], r['unstable']), '',
        '## Figures', '',
        '- accuracy.png: top-1 per variant and head, every seed; training_curves.png: test top-1 of every run; '
        'token_cosines.png: cosine of the two tokens per block, before and after the final norm; disagreement.png: '
        'Table 4, ours and the paper\'s.', '',
        '## Time', '', *_timing_rows(r['runs'], r.get('time_split')), '',
    ]
    return '\n'.join(lines)

# ============ results.json, report.md and the figures ============


def _raw(r: Dict[str, Any]) -> Dict[str, Any]:
    """A run's record for results.json: its top-1 predictions as strings of digits, one per test image."""
    return {**{k: v for k, v in r.items() if k != 'predictions'},
            'predictions': {h: ''.join(map(str, p)) for h, p in r['predictions'].items()}}


def _sizes(measured: Dict[str, Any], fraction: float) -> Dict[str, int]:
    test = measured['tests'][fraction]
    return {'train': next(r['train_images'] for r in measured['runs'] if r['fraction'] == fraction),
            'test': len(test['labels']), 'val': int(sum(test['is_val'])),
            'heldout': len(test['labels']) - int(sum(test['is_val'])), 'probe': measured['probe_images']}


def grid_results(measured: Dict[str, Any], fraction: float) -> Dict[str, Any]:
    """Every summary of one grid: claims judged, accuracies, teachers, tokens, Table 4, convergence, stability."""
    runs = [r for r in measured['runs'] if r['fraction'] == fraction]
    table = by_seed(runs)
    labels = measured['tests'][fraction]['labels']
    return {'sizes': _sizes(measured, fraction), 'table': table, 'runs': runs,
            'claims': judge(grid_claims(table)), 'accuracy': accuracy_summary(table),
            'teachers': teacher_summary(table, runs), 'tokens': token_summary(table), 'table4': table4(table, labels),
            'convergence': convergence(table), 'unstable': unstable(table), 'time_split': measured.get('time_split')}


def _json(made: Dict[str, Any], setting: Dict[str, Any], measured: Dict[str, Any], summary: Dict[str, Any]) -> str:
    tests = {f'{f:g}': {'labels': ''.join(map(str, t['labels'])), 'is_val': ''.join('1' if v else '0' for v in
                                                                                     t['is_val'])}
             for f, t in measured['tests'].items()}
    return json.dumps({'made': made, 'setting': setting, **summary, 'tests': tests,
                       'runs': [_raw(r) for r in measured['runs']]}, indent=1) + '\n'


def write(out: Path, made: Dict[str, Any], setting: Dict[str, Any], measured: Dict[str, Any], sweep: bool) -> None:
    """results.json, the figures and report.md of the claims grid (or of the sweep) in ``out``."""
    if sweep:
        return write_sweep(out, made, setting, measured)
    r = grid_results(measured, setting['fraction'])
    setting = {**setting, 'description': describe(setting, r['sizes'], setting['chosen_by'])}
    summary = {k: v for k, v in r.items() if k not in ('table', 'runs')}
    (out / 'results.json').write_text(_json(made, setting, measured, summary))
    reproduce_figures.accuracy(r['table'], r['teachers'], out / 'accuracy.png')
    reproduce_figures.curves(r['table'], out / 'training_curves.png')
    reproduce_figures.token_cosines(r['tokens'], out / 'token_cosines.png')
    reproduce_figures.disagreement(r['table4'], out / 'disagreement.png')
    (out / 'report.md').write_text(markdown(made, setting, r))


def write_sweep(out: Path, made: Dict[str, Any], setting: Dict[str, Any], measured: Dict[str, Any]) -> None:
    """The sweep: per training fraction its grid's accuracies and teachers, and the gains judged as one family."""
    fractions = sorted(measured['tests'])
    tables = {f: by_seed([r for r in measured['runs'] if r['fraction'] == f]) for f in fractions}
    judged = judge(sweep_claims(tables))
    per_fraction = {f'{f:g}': {'sizes': _sizes(measured, f), 'accuracy': accuracy_summary(tables[f]),
                               'teachers': teacher_summary(tables[f], measured['runs']),
                               'convergence': convergence(tables[f]),
                               'unstable': unstable(tables[f])} for f in fractions}
    sizes = per_fraction[f'{fractions[-1]:g}']['sizes']
    setting = {**setting, 'description': describe({**setting, 'fraction': fractions[-1]}, sizes, setting['chosen_by'])}
    (out / 'results.json').write_text(_json(made, setting, measured, {'claims': judged, 'fractions': per_fraction}))
    reproduce_figures.sweep(judged, per_fraction, out / 'gain_vs_size.png')
    (out / 'report.md').write_text(sweep_markdown(made, setting, judged, per_fraction, measured['runs']))


def sweep_markdown(made: Dict[str, Any], setting: Dict[str, Any], judged: List[Dict[str, Any]],
                   per_fraction: Dict[str, Dict[str, Any]], runs: List[Dict[str, Any]]) -> str:
    """report.md of the sweep."""
    lines = [
        '# The paper\'s premise as a curve: the gain of hard distillation against the training-set size', '',
        '## What made this report', '', *[f'- {key}: `{value}`' for key, value in made.items()], '',
        '## Setting', '', *[f'- {line}' for line in setting['description']],
        '- The sweep trains the plain DeiT-Ti, and the hard-distilled one from each teacher kind, at '
        f'{", ".join(per_fraction)} of each digit\'s training scans, every run with the same number of optimizer '
        'steps; the test images are the same at every size.', '',
        'No paper shows this curve at this scale. The paper\'s premise (section 1): distillation from a convnet '
        'helps a transformer most when data are scarce, since the teacher brings the inductive biases that the '
        'data do not.', '',
        '## The gains', '',
        'Judged as one family (verdicts.py, Holm\'s correction over all of them), with the rules of the claims grid.',
        '', *_claim_rows(judged), '', *[f'- {c["claim"]}: {c["line"]}' for c in judged], '',
        '## Accuracy at each size', '']
    for fraction, f in per_fraction.items():
        lines += [f'### {f["sizes"]["train"]} training images ({fraction} of the scans)', '',
                  *_accuracy_rows(f['accuracy'], f['sizes']['test'], f['sizes']['val']), '',
                  *[f'- {name}, paired by seed: {g["mean"]:+.1f} points' for name, g in f['teachers']['gaps'].items()],
                  '', *_convergence_rows(f['convergence']), '']
        if f['unstable']:
            lines += [f'- unstable: {u["variant"]} seed {u["seed"]} ended at {u["final"]:.1f} (median '
                      f'{u["median"]:.1f})' for u in f['unstable']] + ['']
    lines += ['## Figures', '', '- gain_vs_size.png: the gain of hard distillation over none (95% CI) against the '
              'training images per class, for each teacher kind.', '', '## Time', '', *_timing_rows(runs, None), '']
    return '\n'.join(lines)

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
    if probe['convnet_teacher']:
        lines += ['', f'The convnet teacher, {probe["teacher_rule"]}: **{probe["convnet_teacher"]}**.']
    (out / 'report.md').write_text('\n'.join(lines) + '\n')
