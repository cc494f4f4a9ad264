"""DistillationLoss against a hand computation of the seed's equations 7.1 (soft) and 7.2 (hard)."""
import math

import pytest
import torch
import torch.nn as nn

from losses import DistillationLoss

B, C, D = 6, 7, 5


class RecordingTeacher(nn.Module):
    """A linear teacher that records, at each call, its mode, its input and the autocast state."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, C)
        self.calls = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append({'training': self.training, 'input': x, 'grad': torch.is_grad_enabled()})
        return self.fc(x)


def softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = softmax_by_hand(logits.double())
    return -torch.log(p[torch.arange(len(labels)), labels]).mean()


def soft_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Equation 7.1's KL term: tau^2 * sum_ij p_t (log p_t - log p_s) / (B * C)."""
    p_t = softmax_by_hand(teacher.double() / tau)
    p_s = softmax_by_hand(student.double() / tau)
    return tau ** 2 * (p_t * (p_t.log() - p_s.log())).sum() / student.numel()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(B, D, generator=g)
    cls_logits = 3 * torch.randn(B, C, generator=g)
    dist_logits = 3 * torch.randn(B, C, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    teacher = RecordingTeacher()
    with torch.no_grad():
        teacher.fc.weight.mul_(10)  # spread the teacher's logits so that tau matters
    return inputs, cls_logits, dist_logits, labels, teacher


@pytest.mark.parametrize('alpha', [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize('tau', [0.5, 1.0, 3.0])
def test_soft_matches_equation_7_1(batch, alpha, tau):
    inputs, cls_logits, dist_logits, labels, teacher = batch
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha, tau)
    loss = criterion(inputs, (cls_logits, dist_logits), labels)
    teacher_logits = inputs.double() @ teacher.fc.weight.double().T + teacher.fc.bias.double()
    expected = (1 - alpha) * cross_entropy_by_hand(cls_logits, labels) + alpha * soft_by_hand(
        dist_logits, teacher_logits, tau)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_soft_divides_by_batch_times_classes(batch):
    """The KL sum is divided by B * C, not by B (which would make the term C times larger)."""
    inputs, cls_logits, dist_logits, labels, teacher = batch
    only_kl = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=1.0, tau=1.0)
    loss = only_kl(inputs, (cls_logits, dist_logits), labels)
    teacher_logits = teacher.fc(inputs).detach()
    kl_sum = (softmax_by_hand(teacher_logits.double()) * (torch.log_softmax(teacher_logits.double(), 1)
                                                           - torch.log_softmax(dist_logits.double(), 1))).sum()
    assert loss.item() == pytest.approx(kl_sum.item() / (B * C), rel=1e-5)


@pytest.mark.parametrize('alpha', [0.0, 0.5, 0.9])
def test_hard_matches_equation_7_2(batch, alpha):
    inputs, cls_logits, dist_logits, labels, teacher = batch
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard', alpha, tau=1.0)
    loss = criterion(inputs, (cls_logits, dist_logits), labels)
    teacher_labels = (inputs @ teacher.fc.weight.T + teacher.fc.bias).argmax(dim=1)
    expected = (1 - alpha) * cross_entropy_by_hand(cls_logits, labels) + alpha * cross_entropy_by_hand(
        dist_logits, teacher_labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # tau plays no part in hard distillation
    other_tau = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard', alpha, tau=4.0)
    assert other_tau(inputs, (cls_logits, dist_logits), labels).item() == pytest.approx(loss.item(), rel=1e-6)


def test_none_is_the_base_loss_on_class_logits_for_tensor_and_tuple(batch):
    inputs, cls_logits, dist_logits, labels, _ = batch
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', alpha=0.5, tau=1.0)
    expected = cross_entropy_by_hand(cls_logits, labels).item()
    assert criterion(inputs, cls_logits, labels).item() == pytest.approx(expected, rel=1e-5)
    assert criterion(inputs, (cls_logits, dist_logits), labels).item() == pytest.approx(expected, rel=1e-5)


def test_base_criterion_takes_soft_labels(batch):
    """After mixup the labels are [B, C] distributions; they go to the base criterion unchanged."""
    from timm.loss import SoftTargetCrossEntropy
    inputs, cls_logits, dist_logits, _, teacher = batch
    soft_labels = torch.softmax(torch.randn(B, C), dim=1)
    criterion = DistillationLoss(SoftTargetCrossEntropy(), teacher, 'hard', alpha=0.25, tau=1.0)
    loss = criterion(inputs, (cls_logits, dist_logits), soft_labels)
    base = -(soft_labels.double() * torch.log_softmax(cls_logits.double(), 1)).sum(1).mean()
    teacher_labels = teacher.fc(inputs).argmax(dim=1)
    expected = 0.75 * base + 0.25 * cross_entropy_by_hand(dist_logits, teacher_labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_gradients_reach_student_never_teacher_and_teacher_stays_in_eval(batch, kind):
    inputs, cls_logits, dist_logits, labels, teacher = batch
    teacher.train()
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind, alpha=0.5, tau=2.0)
    criterion.train()  # as a training loop might; must not switch the teacher to training mode
    assert not teacher.training
    cls_logits.requires_grad_(True)
    dist_logits.requires_grad_(True)
    mixed_inputs = inputs.clone().requires_grad_(True)
    criterion(mixed_inputs, (cls_logits, dist_logits), labels).backward()
    assert cls_logits.grad is not None and cls_logits.grad.abs().sum() > 0
    assert dist_logits.grad is not None and dist_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert mixed_inputs.grad is None  # nothing flows back through the teacher to the inputs either
    (call,) = teacher.calls
    assert call['training'] is False and call['grad'] is False
    assert call['input'] is mixed_inputs  # the very batch the student saw


def test_teacher_runs_under_the_callers_autocast(batch):
    inputs, cls_logits, dist_logits, labels, teacher = batch
    seen = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5, tau=1.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = criterion(inputs, (cls_logits.bfloat16(), dist_logits.bfloat16()), labels)
    assert seen == [torch.bfloat16]
    assert math.isfinite(loss.item())


def test_unknown_type_is_a_value_error_listing_choices(batch):
    with pytest.raises(ValueError, match=r"Unknown distillation type 'sofft'.*none, soft, hard"):
        DistillationLoss(nn.CrossEntropyLoss(), batch[4], 'sofft', 0.5, 1.0)


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distillation_without_teacher_is_a_value_error(kind):
    with pytest.raises(ValueError, match=r'needs a teacher.*--teacher-model.*--distillation-type none'):
        DistillationLoss(nn.CrossEntropyLoss(), None, kind, 0.5, 1.0)


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_model_without_distillation_head_is_a_value_error(batch, kind):
    inputs, cls_logits, _, labels, teacher = batch
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind, 0.5, 1.0)
    with pytest.raises(ValueError, match=r'single output.*_distilled_.*--distillation-type none'):
        criterion(inputs, cls_logits, labels)


@pytest.mark.parametrize('alpha, tau, match', [(1.5, 1.0, 'alpha must lie in'), (-0.1, 1.0, 'alpha must lie in'),
                                               (0.5, 0.0, 'tau must be positive')])
def test_out_of_range_alpha_or_tau_is_a_value_error(batch, alpha, tau, match):
    with pytest.raises(ValueError, match=match):
        DistillationLoss(nn.CrossEntropyLoss(), batch[4], 'soft', alpha, tau)


@pytest.mark.parametrize('alpha', [0.0, 0.3, 0.5, 1.0])
def test_dist_head_on_labels_trains_both_heads_with_the_class_heads_loss(batch, alpha):
    """The section 5 control: each head gets the gradient of CE on the labels, weighed by 1 - alpha and alpha.

    d CE / d z = (softmax(z) - onehot(y)) / B for each head, computed here by hand; no teacher is called.
    """
    inputs, cls_logits, dist_logits, labels, teacher = batch
    cls_logits.requires_grad_(True)
    dist_logits.requires_grad_(True)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', alpha, tau=1.0, dist_head_on_labels=True)
    loss = criterion(inputs, (cls_logits, dist_logits), labels)
    loss.backward()
    expected = (1 - alpha) * cross_entropy_by_hand(cls_logits, labels) + alpha * cross_entropy_by_hand(
        dist_logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    onehot = torch.eye(C, dtype=torch.float64)[labels]
    for logits, weight in ((cls_logits, 1 - alpha), (dist_logits, alpha)):
        by_hand = weight * (softmax_by_hand(logits.detach().double()) - onehot) / B
        torch.testing.assert_close(logits.grad.double(), by_hand, rtol=1e-5, atol=1e-7)


def test_dist_head_on_labels_takes_soft_labels_on_both_heads(batch):
    """After mixup the labels are [B, C] distributions: the distillation head gets them as the class head does."""
    from timm.loss import SoftTargetCrossEntropy
    inputs, cls_logits, dist_logits, _, _ = batch
    soft_labels = torch.softmax(torch.randn(B, C), dim=1)
    criterion = DistillationLoss(SoftTargetCrossEntropy(), None, 'none', 0.25, 1.0, dist_head_on_labels=True)
    loss = criterion(inputs, (cls_logits, dist_logits), soft_labels)

    def soft_ce(z: torch.Tensor) -> torch.Tensor:
        return -(soft_labels.double() * torch.log_softmax(z.double(), 1)).sum(1).mean()

    assert loss.item() == pytest.approx((0.75 * soft_ce(cls_logits) + 0.25 * soft_ce(dist_logits)).item(), rel=1e-5)


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_dist_head_on_labels_with_a_teacher_is_a_value_error(batch, kind):
    with pytest.raises(ValueError, match=r'--dist-head-on-labels.*--distillation-type ' + kind):
        DistillationLoss(nn.CrossEntropyLoss(), batch[4], kind, 0.5, 1.0, dist_head_on_labels=True)


def test_dist_head_on_labels_needs_a_distillation_head(batch):
    inputs, cls_logits, _, labels, _ = batch
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0, dist_head_on_labels=True)
    with pytest.raises(ValueError, match=r'--dist-head-on-labels needs a model with a distillation head'):
        criterion(inputs, cls_logits, labels)


# ============ cosub ============

def bce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over images and classes: -mean(t log s + (1 - t) log(1 - s))."""
    s = 1 / (1 + torch.exp(-logits.double()))
    t = targets.double()
    return -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()


def cosub_criterion(*flags: str) -> nn.Module:
    """The training loss main.py builds for these flags and --cosub."""
    import builders
    import main
    args = main.get_args_parser().parse_args(['--cosub', *flags])
    return builders.build_criterion(args, nn.Identity(), C, torch.device('cpu'))


# Label kinds -> (flags, labels as the loop gives them, targets the original's label terms see), by hand.
def cosub_labels(kind: str, labels: torch.Tensor):
    onehot = torch.eye(C, dtype=torch.float64)[labels]
    mixed = 0.7 * onehot + 0.3 * onehot.flip(0)  # mixup of the batch with itself reversed, lambda 0.7
    smoothed = 0.9 * mixed + 0.1 / C  # and smoothing 0.1, both done upstream by timm's Mixup
    if kind == 'mixed':  # without --bce-loss the soft targets go to the loss as they are
        return ['--smoothing', '0.1'], smoothed.float(), smoothed
    if kind == 'binarised':  # --bce-loss: every class in the mix is a positive (targets.gt(0.0))
        return ['--bce-loss', '--smoothing', '0'], mixed.float(), (mixed > 0).double()
    # no mixup: class indices, one-hot encoded with smoothing 0.1 (the original crashed on them)
    return ['--mixup', '0', '--cutmix', '0', '--smoothing', '0.1'], labels, onehot * 0.9 + 0.1 / C


@pytest.mark.parametrize('kind', ['mixed', 'binarised', 'indices'])
def test_cosub_is_the_originals_four_terms(batch, kind):
    """0.25 each: both halves on the labels, each half on the other's detached sigmoid; and the gradient of each
    half is 0.25 * ((s_i - y) + (s_i - s_j)) / (B * C), the other half's probabilities held fixed."""
    _, cls_logits, dist_logits, labels, _ = batch
    flags, loop_labels, y = cosub_labels(kind, labels)
    outputs = torch.cat((cls_logits, dist_logits)).requires_grad_(True)  # the two halves of the doubled batch
    loss = cosub_criterion(*flags)(torch.zeros(2 * B, D), outputs, loop_labels)
    loss.backward()

    o1, o2 = cls_logits.double(), dist_logits.double()
    s1, s2 = torch.sigmoid(o1), torch.sigmoid(o2)
    expected = 0.25 * (bce_by_hand(o1, y) + bce_by_hand(o2, y) + bce_by_hand(o1, s2) + bce_by_hand(o2, s1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    by_hand = 0.25 * torch.cat(((s1 - y) + (s1 - s2), (s2 - y) + (s2 - s1))) / (B * C)
    torch.testing.assert_close(outputs.grad.double(), by_hand, rtol=1e-5, atol=1e-8)
