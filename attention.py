"""Where the class and distillation tokens look in an image: attention maps of a timm ViT / DeiT (analyze.py's
``attention`` command), from the last block or rolled out over all blocks."""
from contextlib import contextmanager
from typing import Iterator, List

import torch
import torch.nn as nn

METHODS = {'rollout': 'attention rollout over all blocks (Abnar & Zuidema, 2020)',
           'last': 'last block, mean over heads'}


@contextmanager
def _attention_probabilities(model: nn.Module) -> Iterator[List[torch.Tensor]]:
    """Inside the block, a forward pass appends each block's attention probabilities [B, heads, N, N] to the list.

    The fused kernel (scaled_dot_product_attention) never materialises them, so it is switched off for the
    pass: timm's unfused path computes softmax(q k^T * scale) and hands it to attn_drop, whose input the hook
    records (in eval mode attn_drop changes nothing).
    """
    blocks = getattr(model, 'blocks', None)
    if blocks is None or not all(hasattr(getattr(b, 'attn', None), 'attn_drop') for b in blocks):
        raise ValueError(f'{type(model).__name__} has no transformer blocks with timm attention: attention maps '
                         'need a ViT / DeiT model')
    attns = [block.attn for block in blocks]
    captured: List[torch.Tensor] = []
    fused = [attn.fused_attn for attn in attns]
    handles = [attn.attn_drop.register_forward_hook(lambda m, inputs, output: captured.append(inputs[0].float()))
               for attn in attns]
    try:
        for attn in attns:
            attn.fused_attn = False
        yield captured
    finally:
        for attn, was_fused in zip(attns, fused):
            attn.fused_attn = was_fused
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, method: str = 'rollout') -> torch.Tensor:
    """Where each extra token (class, then distillation) looks in one image: [T, h, w] over the patch grid.

    Args:
        image: [3, H, W], normalised as the model's input (datasets.build_eval_transform).
        method: 'last': the last block's attention of the token to each patch, averaged over heads;
            'rollout': attention rollout (Abnar & Zuidema, 2020): per block A' = (mean over heads + I) / 2,
            rows renormalised, multiplied through the blocks, read at the token's row.
    """
    if method not in METHODS:
        raise ValueError(f'unknown attention method {method!r}; choose one of {", ".join(METHODS)}')
    model.eval()
    device = next(model.parameters()).device
    with _attention_probabilities(model) as attentions:
        model(image.unsqueeze(0).to(device))
    per_block = [a[0].mean(dim=0) for a in attentions]  # [N, N] each, heads averaged
    if method == 'last':
        flow = per_block[-1]
    else:
        eye = torch.eye(per_block[0].shape[0], device=per_block[0].device)
        flow = eye
        for attention in per_block:
            mixed = (attention + eye) / 2  # the residual connection carries each token's own half
            flow = (mixed / mixed.sum(dim=-1, keepdim=True)) @ flow
    num_extra = model.num_prefix_tokens
    h, w = model.patch_embed.grid_size
    return flow[:num_extra, num_extra:].reshape(num_extra, h, w).cpu()
