"""Figures of analyze.py, drawn by matplotlib's Agg backend: attention maps over an image, and the training curves
of main.py's log.txt files. matplotlib is imported only when a figure is drawn.
"""
import json
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from attention import METHODS


class MissingPackage(ImportError):
    """An optional package (matplotlib) that a figure needs is not installed."""


def figure(width: float, height: float, dpi: int) -> Any:
    """A matplotlib Figure drawn by the Agg backend (no pyplot state); saved without cropping, it is exactly
    width x height inches at ``dpi``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingPackage('the figures need matplotlib: pip install matplotlib') from None
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_attention(image: torch.Tensor, maps: torch.Tensor, method: str, out: str, dpi: int = 100,
                   panel_inches: float = 3.0) -> None:
    """Image, then each token's map drawn over it, side by side: (1 + T) * panel_inches x (panel_inches + 0.5).

    Args:
        image: [3, H, W] normalised with ImageNet mean / std (the model's input).
        maps: [T, h, w] from attention_maps; each map's range is scaled to [0, 1] for display.
    """
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    rgb = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # [H, W, 3] in [0, 1]
    fig = figure((1 + len(maps)) * panel_inches, panel_inches + 0.5, dpi)
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].set_title('input (eval transform)', fontsize=9)
    for ax, name, attention in zip(axes[1:], ('class token', 'distillation token'), maps):
        upsampled = F.interpolate(attention[None, None], size=rgb.shape[:2], mode='bilinear', align_corners=False)[0, 0]
        ax.imshow(rgb)
        low, high = attention.min(), attention.max()
        ax.imshow(((upsampled - low) / (high - low).clamp_min(1e-12)).numpy(), cmap='jet', alpha=0.5, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis('off')
    fig.suptitle(f'Where the tokens look: {METHODS[method]}\n(each map over {maps.shape[1]}x{maps.shape[2]} '
                 'patches, from its minimum (blue) to its maximum (red))', fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.8, wspace=0.05)
    fig.savefig(out, dpi=dpi)


def read_log(path: str) -> List[Dict[str, Any]]:
    """The epochs of main.py's log.txt (one JSON object per line); a last line cut short by a kill is skipped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: no such file') from None
    except UnicodeDecodeError:
        raise ValueError(f'{path} is not a text file: give the log.txt that main.py writes in --output_dir') from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not line.endswith('\n'):
                continue
            record = None
        if not isinstance(record, dict) or 'epoch' not in record:
            raise ValueError(f'{path}, line {number}: not an epoch of main.py\'s log.txt (a JSON object with "epoch")')
        records.append(record)
    if not records:
        raise ValueError(f'{path} holds no epoch yet')
    return records


def _series(records: List[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    """(epochs, values) of the epochs that logged ``key`` (an older log may lack the EMA's)."""
    points = [(r['epoch'], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(logs: Dict[str, List[Dict[str, Any]]], out: str, dpi: int = 100) -> None:
    """Train loss, test top-1 (dashed: the EMA's) and learning rate per epoch, one line per run: 15 x 4.5 inches.

    Args:
        logs: run name -> read_log(...) of its log.txt.
    """
    fig = figure(15, 4.5, dpi)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for index, (name, records) in enumerate(logs.items()):
        color = f'C{index % 10}'
        ax_loss.plot(*_series(records, 'train_loss'), color=color, marker='.', label=name)
        ax_acc.plot(*_series(records, 'test_acc1'), color=color, marker='.', label=name)
        ema_epochs, ema_acc = _series(records, 'test_ema_acc1')
        if ema_epochs:
            ax_acc.plot(ema_epochs, ema_acc, color=color, linestyle='--', marker='x', label=f'{name} (EMA)')
        ax_lr.plot(*_series(records, 'train_lr'), color=color, marker='.', label=name)
    for ax, ylabel, title in ((ax_loss, 'train loss (mean over the epoch)', 'Training loss'),
                              (ax_acc, 'test top-1 accuracy (%)', 'Test top-1'),
                              (ax_lr, 'learning rate', 'Learning rate')):
        ax.set_xlabel('epoch')
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    lrs = [value for line in ax_lr.get_lines() for value in line.get_ydata()]
    if lrs and min(lrs) > 0:
        ax_lr.set_yscale('log')
        ax_lr.set_ylabel('learning rate (log scale)')
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
