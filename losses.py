"""The distillation loss of DeiT (Touvron et al., 2020, section 4; equations 7.1 and 7.2 of the seed), and the
co-training loss of cosub (Touvron et al., 2022, "Co-training 2L Submodels for Visual Recognition")."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

DISTILLATION_TYPES = ('none', 'soft', 'hard')


class DistillationLoss(nn.Module):
    """A base criterion on the class head, plus distillation from a teacher on the distillation head.

    ``none``: base loss only. ``soft``: (1 - alpha) * base + alpha * tau^2 * KL(teacher || student)
    on temperature-softened distributions. ``hard``: (1 - alpha) * base + alpha * CE(dist_logits,
    argmax of the teacher).

    With ``dist_head_on_labels`` (the control of the paper's section 5, "a second class token in place of the
    distillation token"): no teacher, and the distillation head is trained on the labels exactly as the class head,
    (1 - alpha) * base(class logits) + alpha * base(distillation logits); ``distillation_type`` must be 'none'.

    The teacher is kept in eval mode (also after ``criterion.train()``) and runs without gradients
    on the inputs the student saw, i.e. after mixup / cutmix, inside the caller's autocast context.

    Args:
        base_criterion: loss on the class logits and the labels (e.g. SoftTargetCrossEntropy).
        teacher_model: the teacher; may be None only with ``distillation_type='none'``.
        distillation_type: 'none', 'soft' or 'hard'.
        alpha: weight of the distillation term, in [0, 1].
        tau: softmax temperature of soft distillation, > 0.
        dist_head_on_labels: train the distillation head on the labels with the base criterion (no teacher).
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float, dist_head_on_labels: bool = False) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"Unknown distillation type '{distillation_type}'; "
                             f"choose one of {', '.join(DISTILLATION_TYPES)} (--distillation-type).")
        if dist_head_on_labels and distillation_type != 'none':
            raise ValueError(f'--dist-head-on-labels trains the distillation head on the labels, without a teacher, '
                             f'and --distillation-type {distillation_type} trains it on the teacher: give one of them')
        if distillation_type != 'none' or dist_head_on_labels:
            if distillation_type != 'none' and teacher_model is None:
                raise ValueError(f"--distillation-type {distillation_type} needs a teacher: give --teacher-model "
                                 "and --teacher-path, or train without distillation (--distillation-type none).")
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f'--distillation-alpha must lie in [0, 1] (it weighs the distillation term '
                                 f'against the label term), got {alpha}.')
            if distillation_type != 'none' and tau <= 0:
                raise ValueError(f'--distillation-tau must be positive (it divides the logits), got {tau}.')
        if teacher_model is not None:
            teacher_model.eval()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.dist_head_on_labels = dist_head_on_labels

    def train(self, mode: bool = True) -> 'DistillationLoss':
        """Switch the base criterion only: the teacher always predicts in eval mode."""
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()
        return self

    def forward(self, inputs: torch.Tensor, outputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                labels: torch.Tensor) -> torch.Tensor:
        """Loss of one batch.

        Args:
            inputs: [B, 3, H, W], the batch the student saw (after mixup), fed to the teacher.
            outputs: class logits [B, C], or (class logits, distillation logits), each [B, C].
            labels: targets for the base criterion: [B] class indices or [B, C] (mixed) soft labels.
        """
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none' and not self.dist_head_on_labels:
            return base_loss
        if outputs_kd is None:
            what, instead = f'--distillation-type {self.distillation_type}', '--distillation-type none'
            if self.dist_head_on_labels:
                what, instead = '--dist-head-on-labels', 'drop --dist-head-on-labels'
            raise ValueError(f'{what} needs a model with a distillation head, but this one returns a single output: '
                             f'use a *_distilled_* model (e.g. deit_base_distilled_patch16_224) or {instead}.')
        if self.dist_head_on_labels:
            return base_loss * (1 - self.alpha) + self.base_criterion(outputs_kd, labels) * self.alpha

        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)

        if self.distillation_type == 'soft':
            tau = self.tau
            # KL(softmax(z_t / tau) || softmax(z_s / tau)), summed over batch and classes, then divided
            # by B * C (numel) rather than by B: this is the element-wise mean of PyTorch's legacy
            # `reduction='mean'`, the scale with which the paper's alpha / tau were tuned; the textbook
            # 'batchmean' would multiply the term by C and change what a given alpha means. The original
            # keeps numel for this reason (facebookresearch/deit issue #61). In float32 because CPU
            # autocast leaves log_softmax in bf16, which would round the small per-element terms.
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd.float() / tau, dim=1),
                F.log_softmax(teacher_outputs.float() / tau, dim=1),
                reduction='sum',
                log_target=True,
            ) * (tau * tau) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))

        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


class CosubLoss(nn.Module):
    """The original's --cosub loss (its engine.py): two sub-models, drawn by stochastic depth, each supervised by the
    labels and by the other's predictions.

    The model runs once on the batch twice over (train_one_epoch concatenates it to itself): drop path draws its
    own mask per image, so each half meets the other sub-models. With ``o1`` and ``o2`` the logits of the two
    halves and ``bce`` the binary cross-entropy with logits, averaged over images and classes::

        loss = 0.25 * (label_criterion(o1, y) + label_criterion(o2, y)
                       + bce(o1, sigmoid(o2).detach()) + bce(o2, sigmoid(o1).detach()))

    Args:
        label_criterion: the binary cross-entropy of the label terms, with the original's handling of the labels
            (timm's BinaryCrossEntropy: class indices one-hot encoded, mixed targets binarised under --bce-loss).
    """

    def __init__(self, label_criterion: nn.Module) -> None:
        super().__init__()
        self.label_criterion = label_criterion

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of one batch.

        Args:
            inputs: [2B, 3, H, W], the batch twice over; unused, the argument of DistillationLoss's signature.
            outputs: [2B, C] logits, the first B of the first sub-model, the last B of the second.
            labels: [B] class indices or [B, C] (mixed) soft labels of the batch, once.
        """
        first, second = outputs.chunk(2)
        label_terms = self.label_criterion(first, labels) + self.label_criterion(second, labels)
        # Each sub-model learns the other's probabilities, which are targets here, not paths for gradients.
        peer_terms = (F.binary_cross_entropy_with_logits(first, second.detach().sigmoid())
                      + F.binary_cross_entropy_with_logits(second, first.detach().sigmoid()))
        return 0.25 * (label_terms + peer_terms)
