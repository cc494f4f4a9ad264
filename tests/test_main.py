"""main.py and utils.py, in-process: the command line, the helpers of each flow, checkpoint I/O, distributed setup.

The flows themselves, run as a user runs them, are in test_e2e_main.py.
"""
import argparse
import builtins
import re
import shlex
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import builders
import checkpoints
import main
import models
import utils

# The original DeiT main.py's flags and defaults (SPEC, "Command line"); --cooldown-epochs is the one
# changed default: the original parsed 10 but never trained those epochs, so 0 keeps its schedule.
ORIGINAL_DEFAULTS = {
    'batch_size': 64, 'epochs': 300, 'bce_loss': False, 'unscale_lr': False,
    'model': 'deit_base_patch16_224', 'input_size': 224, 'drop': 0.0, 'drop_path': 0.1, 'model_ema': True,
    'model_ema_decay': 0.99996, 'model_ema_force_cpu': False,
    'opt': 'adamw', 'opt_eps': 1e-8, 'opt_betas': None, 'clip_grad': None, 'momentum': 0.9, 'weight_decay': 0.05,
    'sched': 'cosine', 'lr': 5e-4, 'lr_noise': None, 'lr_noise_pct': 0.67, 'lr_noise_std': 1.0, 'warmup_lr': 1e-6,
    'min_lr': 1e-5, 'decay_epochs': 30, 'warmup_epochs': 5, 'cooldown_epochs': 0, 'patience_epochs': 10,
    'decay_rate': 0.1,
    'color_jitter': 0.3, 'aa': 'rand-m9-mstd0.5-inc1', 'smoothing': 0.1, 'train_interpolation': 'bicubic',
    'train_mode': True, 'ThreeAugment': False, 'src': False, 'reprob': 0.25, 'remode': 'pixel', 'recount': 1,
    'resplit': False,
    'mixup': 0.8, 'cutmix': 1.0, 'cutmix_minmax': None, 'mixup_prob': 1.0, 'mixup_switch_prob': 0.5,
    'mixup_mode': 'batch',
    'teacher_model': 'regnety_160', 'teacher_path': '', 'distillation_type': 'none', 'distillation_alpha': 0.5,
    'distillation_tau': 1.0,
    'finetune': '', 'attn_only': False,
    'data_path': '/datasets01/imagenet_full_size/061417/', 'data_set': 'IMNET', 'inat_category': 'name',
    'output_dir': '', 'seed': 0, 'resume': '', 'start_epoch': 0, 'eval': False, 'eval_crop_ratio': 0.875,
    'dist_eval': False, 'num_workers': 10, 'pin_mem': True,
    'world_size': 1, 'dist_url': 'env://', 'distributed': False, 'cosub': False,
}


def parse(*argv: str) -> argparse.Namespace:
    return main.get_args_parser().parse_args(list(argv))


def tiny_deit(name: str = 'deit_tiny_patch16_224', **kwargs) -> torch.nn.Module:
    """A 2-block, 48-wide model of a DeiT name: the same code path as the full size."""
    return timm.create_model(name, depth=2, embed_dim=48, num_heads=3, **kwargs)


# ============ the command line ============


def test_every_flag_of_the_original_keeps_its_default():
    args = vars(parse())
    assert {k: args[k] for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    # The additions: classes from the dataset, and the device / precision chosen at run time.
    assert args['nb_classes'] is None and args['precision'] == 'auto' and args['eval_head'] == 'avg'
    assert args['device'] == ('cuda' if torch.cuda.is_available() else 'cpu')


def test_types_negations_and_aliases():
    args = parse('--decay-epochs', '2.5', '--opt-betas', '0.9', '0.95', '--lr-noise', '0.4', '0.9', '--no-model-ema',
                 '--no-pin-mem', '--no-train-mode', '--no-repeated-aug', '--dr', '0.5', '--cutmix-minmax', '0.2', '0.8')
    assert args.decay_epochs == 2.5 and args.opt_betas == [0.9, 0.95] and args.lr_noise == [0.4, 0.9]
    assert args.cutmix_minmax == [0.2, 0.8] and args.decay_rate == 0.5
    assert (args.model_ema, args.pin_mem, args.train_mode, args.repeated_aug) == (False, False, False, False)
    underscore = parse('--output_dir', 'o', '--start_epoch', '3', '--num_workers', '2', '--world_size', '4',
                       '--dist_url', 'tcp://h:1', '--ThreeAugment')
    kebab = parse('--output-dir', 'o', '--start-epoch', '3', '--num-workers', '2', '--world-size', '4',
                  '--dist-url', 'tcp://h:1', '--three-augment')
    assert vars(underscore) == vars(kebab)
    assert (kebab.output_dir, kebab.start_epoch, kebab.num_workers, kebab.world_size) == ('o', 3, 2, 4)
    assert kebab.ThreeAugment is True


def test_every_help_string_states_the_default():
    parser = main.get_args_parser()
    for action in parser._actions:
        negation = action.option_strings[0].startswith('--no-') and isinstance(action, argparse._StoreFalseAction)
        if not negation:
            assert 'default' in action.help or 'not supported' in action.help, action.option_strings


def test_repeated_augmentation_is_on_when_distributed_unless_turned_off():
    assert parse().repeated_aug is None  # decided in build_data: on when distributed, as the original
    assert parse('--repeated-aug').repeated_aug is True


@pytest.mark.parametrize('argv, message', [
    (['--resplit'], '--resplit'),
    (['--cooldown-epochs', '5', '--sched', 'step'], '--cooldown-epochs'),
    (['--persistent-workers', '--num_workers', '0'], '--persistent-workers'),
    (['--fused', '--opt', 'sgd'], '--fused'),
    (['--distillation-type', 'hard'], '--teacher-path'),
    (['--batch-size', '33'], 'even --batch-size'),
    (['--batch-size', '0'], '--batch-size'),
    (['--bce-loss'], '--smoothing 0'),
])
def test_bad_flag_combinations_are_refused_with_a_message(argv, message):
    with pytest.raises(ValueError, match=message):
        main.check_args(parse(*argv))


def test_odd_batch_is_fine_without_mixup_and_distillation_is_fine_in_eval():
    main.check_args(parse('--batch-size', '33', '--mixup', '0', '--cutmix', '0'))
    main.check_args(parse('--eval', '--distillation-type', 'hard'))


@pytest.mark.parametrize('argv, message', [
    (['--model', 'deit_tiny_patch16_224', '--dist-head-on-labels'], 'deit_tiny_patch16_224 has none'),
    (['--model', 'deit_tiny_distilled_patch16_224', '--dist-head-on-labels', '--distillation-type', 'hard',
      '--teacher-model', 'resnet18', '--teacher-path', 'teacher.pth'], 'give one of them'),
])
def test_dist_head_on_labels_needs_a_distillation_head_and_no_teacher(argv, message):
    with pytest.raises(ValueError, match=message):
        main.check_args(parse(*argv))


class CriterionBuilt(Exception):
    """Raised right after main() builds its loss, carrying it: the run stops before any training step."""


@pytest.mark.parametrize('extra, frozen, evaluation_note', [([], True, True), (['--eval-head', 'cls'], True, False),
                                                            (['--dist-head-on-labels'], False, False)])
def test_a_distillation_head_that_no_loss_trains_is_frozen_and_said_so(
        extra, frozen, evaluation_note, image_folder, monkeypatch, capsys):
    build_criterion = builders.build_criterion

    def build_and_stop(args, model, *rest):
        raise CriterionBuilt(build_criterion(args, model, *rest), model)

    monkeypatch.setattr(builders, 'build_criterion', build_and_stop)
    with pytest.raises(CriterionBuilt) as built:
        main.cli(['--model', 'deit_tiny_distilled_patch16_224', '--data-set', 'FOLDER', '--data-path',
                  str(image_folder), '--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--device',
                  'cpu', *extra])
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines()
             if 'distillation head of deit_tiny_distilled_patch16_224, so it is frozen: it keeps its initial' in line]
    assert len(notes) == frozen
    if frozen:
        assert ('averaged in at evaluation' in notes[0] and '--dist-head-on-labels' in notes[0]) == evaluation_note
    criterion, model = built.value.args
    assert criterion.dist_head_on_labels == ('--dist-head-on-labels' in extra)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters()} - (
        {'head_dist.weight', 'head_dist.bias'} if frozen else set())
    # log.txt's n_parameters: the trainable parameters
    assert f'number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}\n' in out


# ============ helpers of the flows ============


def test_lr_is_scaled_by_the_total_batch_and_the_base_lr_is_kept():
    args = parse('--batch-size', '256', '--lr', '1e-3')
    assert builders.scaled_lr(args) == pytest.approx(1e-3 * 256 / 512) and args.lr == 1e-3
    assert builders.scaled_lr(parse('--batch-size', '256', '--lr', '1e-3', '--unscale-lr')) == 1e-3


def test_precision_auto_is_fp16_on_cuda_and_off_on_cpu():
    assert builders.amp_dtype_of('auto', torch.device('cuda')) is torch.float16
    assert builders.amp_dtype_of('auto', torch.device('cpu')) is None
    assert builders.amp_dtype_of('bf16', torch.device('cpu')) is torch.bfloat16


def test_seed_everything_gives_one_stream_per_seed_rank_epoch():
    def draws(*seeds):
        builders.seed_everything(*seeds)
        return torch.rand(3).tolist(), np.random.rand(), __import__('random').random()

    assert draws(0, 0, 1) == draws(0, 0, 1)
    assert len({str(draws(0, 0, 1)), str(draws(0, 0, 2)), str(draws(0, 1, 1)), str(draws(1, 0, 1))}) == 4


def test_criterion_is_chosen_as_the_original():
    assert isinstance(builders.base_criterion(parse()), SoftTargetCrossEntropy)
    no_mix = ('--mixup', '0', '--cutmix', '0')
    assert isinstance(builders.base_criterion(parse(*no_mix)), LabelSmoothingCrossEntropy)
    assert isinstance(builders.base_criterion(parse(*no_mix, '--smoothing', '0')), torch.nn.CrossEntropyLoss)


@pytest.mark.parametrize('mixup', [True, False])
def test_bce_loss_with_and_without_mixup(mixup):
    logits = torch.randn(4, 5)
    if mixup:
        criterion = builders.base_criterion(parse('--bce-loss', '--smoothing', '0'))
        mixed = torch.tensor([[0.7, 0.3, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0.2, 0, 0.8], [0.5, 0, 0, 0.5, 0]])
        # The original binarises: each class in the mix is a positive.
        assert torch.allclose(criterion(logits, mixed), F.binary_cross_entropy_with_logits(logits, (mixed > 0).float()))
    else:
        labels = torch.tensor([0, 3, 1, 4])
        criterion = builders.base_criterion(parse('--bce-loss', '--mixup', '0', '--cutmix', '0', '--smoothing', '0.1'))
        target = torch.full((4, 5), 0.1 / 5)
        target[torch.arange(4), labels] = 1 - 0.1 + 0.1 / 5
        assert torch.allclose(criterion(logits, labels), F.binary_cross_entropy_with_logits(logits, target))


def test_optimizer_gets_the_scaled_lr_and_fused_adamw_on_request():
    model = tiny_deit(num_classes=3)
    args = parse('--batch-size', '128')
    args.actual_lr = builders.scaled_lr(args)
    optimizer = builders.build_optimizer(args, model, torch.device('cpu'))
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults['fused']
    assert all(group['lr'] == pytest.approx(5e-4 / 4) for group in optimizer.param_groups)
    # timm's grouping: no weight decay on biases, norms, tokens and position embedding.
    no_decay = next(g for g in optimizer.param_groups if g['weight_decay'] == 0)['params']
    assert any(p is model.pos_embed for p in no_decay) and any(p is model.cls_token for p in no_decay)
    args = parse('--fused')
    args.actual_lr = 1e-3
    assert builders.build_optimizer(args, model, torch.device('cpu')).defaults['fused'] is True


def test_channels_last_teacher(tmp_path):
    teacher = timm.create_model('resnet10t', num_classes=3)
    torch.save({'model': teacher.state_dict()}, tmp_path / 'teacher.pth')
    args = parse('--teacher-model', 'resnet10t', '--teacher-path', str(tmp_path / 'teacher.pth'), '--channels-last')
    loaded = builders.build_teacher(args, 3, torch.device('cpu'))
    assert loaded.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('flags, persistent', [
    (['--num_workers', '1'], True),  # the default with workers
    (['--num_workers', '1', '--persistent-workers'], True),
    (['--num_workers', '1', '--no-persistent-workers'], False),
    (['--num_workers', '0'], False),
])
def test_loader_workers_persist_by_default(flags, persistent, image_folder):
    args = parse('--data-set', 'FOLDER', '--data-path', str(image_folder), '--input-size', '32', *flags)
    args.distributed = False
    _, _, loader_train, loader_val, _ = builders.build_data(args, torch.device('cpu'))
    assert loader_train.persistent_workers is loader_val.persistent_workers is persistent


@pytest.mark.parametrize('flag, sampler', [([], 'RandomSampler'), (['--repeated-aug'], 'RASampler')])
def test_repeated_augmentation_in_one_process_on_request(flag, sampler, image_folder):
    args = parse('--data-set', 'FOLDER', '--data-path', str(image_folder), '--input-size', '32', '--num_workers', '0',
                 *flag)
    args.distributed = False
    _, _, loader_train, loader_val, _ = builders.build_data(args, torch.device('cpu'))
    assert type(loader_train.sampler.sampler).__name__ == sampler  # inside seeding.SeededSampler
    assert isinstance(loader_val.sampler, torch.utils.data.SequentialSampler)


def test_create_model_sets_the_input_size_of_vits_only():
    vit = builders.create_model('deit_tiny_patch16_224', 48, num_classes=3, depth=1)
    assert vit.patch_embed.img_size == (48, 48) and vit.pos_embed.shape[1] == 9 + 1
    convnet = builders.create_model('resnet10t', 48, num_classes=3)
    assert convnet(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    with pytest.raises(ValueError, match='Unknown model'):
        builders.create_model('deit_enormous', 48)


def test_attn_only_trains_what_the_original_trains():
    """The original trains '.attn.' parameters, head and pos_embed; patch_embed, tokens and head_dist stay frozen."""
    model = tiny_deit('deit_tiny_distilled_patch16_224', num_classes=3)
    count = builders.train_attention_only(model, 'deit_tiny_distilled_patch16_224')
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {'pos_embed', 'head.weight', 'head.bias'}
    expected |= {f'blocks.{i}.attn.{m}.{p}' for i in range(2) for m in ('qkv', 'proj') for p in ('weight', 'bias')}
    assert trainable == expected
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    with pytest.raises(ValueError, match='--attn-only'):
        builders.train_attention_only(timm.create_model('resnet10t'), 'resnet10t')


def test_attn_only_count_of_deit_small_distilled_is_the_originals():
    """7.56M trainable parameters, as the original (ours used to train 8.24M: patch_embed, tokens, head_dist)."""
    with builders.skeleton_device():
        model = timm.create_model('deit_small_distilled_patch16_224')
    count = builders.train_attention_only(model, 'deit_small_distilled_patch16_224')
    # 12 blocks x (qkv 384*1152 + 1152, proj 384*384 + 384) + head 384*1000 + 1000 + pos_embed 198*384
    assert count == 12 * (384 * 1152 + 1152 + 384 * 384 + 384) + 384 * 1000 + 1000 + 198 * 384 == 7_557_352


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_finetune_resizes_pos_embed_keeps_extra_tokens_and_drops_other_heads(name, tmp_path, capsys):
    source = tiny_deit(name, num_classes=1000)  # 224: a 14 x 14 grid
    path = tmp_path / 'official.pth'
    torch.save({'model': source.state_dict()}, path)
    model = tiny_deit(name, num_classes=3, img_size=48)  # a 3 x 3 grid
    own_heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('head')}
    checkpoints.load_finetune(model, str(path))

    extra = 2 if 'distilled' in name else 1
    pos = source.pos_embed.detach()
    grid = pos[:, extra:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(3, 3), mode='bicubic', align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, 9, 48)
    assert torch.equal(model.pos_embed[:, :extra], pos[:, :extra])
    assert torch.allclose(model.pos_embed[:, extra:], resized, atol=1e-6)
    for key, value in model.state_dict().items():
        if key.startswith('head'):
            assert torch.equal(value, own_heads[key])  # dropped from the file: the model's own init stays
        elif key != 'pos_embed':
            assert torch.equal(value, source.state_dict()[key]), key
    out = capsys.readouterr().out
    assert 'Removing key head.weight' in out and "missing keys ['head.weight', 'head.bias'" in out


def test_finetune_keeps_heads_of_the_same_shape(tmp_path):
    source = tiny_deit(num_classes=3)
    torch.save({'model': source.state_dict()}, tmp_path / 'same.pth')
    model = tiny_deit(num_classes=3)
    checkpoints.load_finetune(model, str(tmp_path / 'same.pth'))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_teacher_accepts_official_files_and_our_checkpoints(tmp_path):
    teacher = timm.create_model('resnet10t', num_classes=3)
    torch.save({'model': teacher.state_dict()}, tmp_path / 'official.pth')
    torch.save({'model': teacher.state_dict(), 'epoch': 3, 'args': {'model': 'resnet10t'}, 'classes': ['a', 'b', 'c'],
                'model_ema': teacher.state_dict()}, tmp_path / 'checkpoint.pth')
    x = torch.randn(2, 3, 32, 32)
    for file in ('official.pth', 'checkpoint.pth'):
        args = parse('--teacher-model', 'resnet10t', '--teacher-path', str(tmp_path / file), '--input-size', '32')
        loaded = builders.build_teacher(args, 3, torch.device('cpu'))
        assert not loaded.training and torch.equal(loaded(x), teacher.eval()(x))
    args = parse('--teacher-model', 'resnet18', '--teacher-path', str(tmp_path / 'official.pth'))
    with pytest.raises(ValueError, match='does not fit'):
        builders.build_teacher(args, 3, torch.device('cpu'))


# ============ checkpoint I/O ============


def test_save_on_master_keeps_the_previous_checkpoint_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    utils.save_on_master({'epoch': 1, 'w': torch.ones(3)}, str(path))

    def dying_save(obj, f):
        f.write(b'PK partial')
        raise KeyboardInterrupt  # as a kill would stop it half-way

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_on_master({'epoch': 2, 'w': torch.zeros(3)}, str(path))
    assert utils.load_checkpoint(str(path))['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pth']  # no temporary file left behind


def test_load_checkpoint_refuses_pickled_objects_and_names_corrupt_files(tmp_path):
    torch.save({'model': {}, 'opt': torch.optim.SGD}, tmp_path / 'pickled.pth')
    with pytest.raises(utils.CheckpointError, match='torch.optim.sgd.SGD.*weights_only'):
        utils.load_checkpoint(str(tmp_path / 'pickled.pth'))
    torch.save({'w': torch.ones(1000)}, tmp_path / 'good.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'good.pth').read_bytes()[:500])
    for name, message in [('cut.pth', 'truncated'), ('missing.pth', 'no such file')]:
        with pytest.raises(utils.CheckpointError, match=message) as e:
            utils.load_checkpoint(str(tmp_path / name))
        assert '\n' not in str(e.value)


def test_checkpoints_of_the_original_code_load(tmp_path):
    # The original pickled argparse.Namespace as 'args'; that class only holds attributes.
    torch.save({'model': {'w': torch.ones(1)}, 'args': argparse.Namespace(lr=5e-4)}, tmp_path / 'old.pth')
    assert utils.load_checkpoint(str(tmp_path / 'old.pth'))['args'].lr == 5e-4


# ============ distributed setup ============


def test_single_process_without_launcher(monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(var, raising=False)
    args = parse('--device', 'cpu')
    utils.init_distributed_mode(args)
    assert args.distributed is False
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '1')  # `srun python main.py`: one task is a plain run
    utils.init_distributed_mode(args)
    assert args.distributed is False
    with pytest.raises(ValueError, match='torchrun --nproc_per_node=2'):
        utils.init_distributed_mode(parse('--device', 'cpu', '--world_size', '2'))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def launcher_env(monkeypatch):
    """A clean launcher environment with a local rendezvous; print and warnings restored afterwards."""
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))
    monkeypatch.setattr(builtins, 'print', builtins.print)
    monkeypatch.setattr(warnings, 'filters', list(warnings.filters))
    return monkeypatch


def test_torchrun_environment_starts_a_gloo_group_on_cpu(launcher_env):
    for k, v in {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}.items():
        launcher_env.setenv(k, v)
    args = parse('--device', 'cpu')
    try:
        utils.init_distributed_mode(args)
        assert (args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend) == (True, 0, 1, 0, 'gloo')
        assert dist.is_initialized() and dist.get_backend() == 'gloo'
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_slurm_environment_is_read(launcher_env):
    # Task 1 of a 2-task job on its node's second slot; the group itself would wait for task 0.
    for k, v in {'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_LOCALID': '1'}.items():
        launcher_env.setenv(k, v)
    calls = []
    launcher_env.setattr(dist, 'init_process_group', lambda **kw: calls.append(kw))
    launcher_env.setattr(dist, 'barrier', lambda: None)
    args = parse('--device', 'cpu')
    utils.init_distributed_mode(args)
    assert calls == [dict(backend='gloo', init_method='env://', world_size=2, rank=1)]
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 1, 2, 1)


def test_distributed_launch_needs_a_rendezvous(monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    with pytest.raises(ValueError, match='MASTER_ADDR'):
        utils.init_distributed_mode(parse('--device', 'cpu'))
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', '1')
    with pytest.raises(ValueError, match='--world_size 4 disagrees'):
        utils.init_distributed_mode(parse('--device', 'cpu', '--world_size', '4'))


# ============ the seed's commands ============

# Every command of the seed article, as written there (run_with_submitit.py's own flags --use_volta32
# and --nodes are left to its parser; its remaining flags are main.py's).
SEED_COMMANDS = [
    'python main.py --eval --resume https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth '
    '--data-path /path/to/imagenet',
    'python main.py --eval --resume https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth '
    '--model deit_small_patch16_224 --data-path /path/to/imagenet',
    'python main.py --eval --resume https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth '
    '--model deit_tiny_patch16_224 --data-path /path/to/imagenet',
    'python main.py --eval --model deit_base_distilled_patch16_384 --input-size 384 '
    '--resume https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth',
    'python -m torch.distributed.launch --nproc_per_node=4 --use_env main.py --model deit_small_patch16_224 '
    '--batch-size 256 --data-path /path/to/imagenet --output_dir /path/to/save',
    'python -m torch.distributed.launch --nproc_per_node=4 --use_env main.py --model deit_tiny_patch16_224 '
    '--batch-size 256 --data-path /path/to/imagenet --output_dir /path/to/save',
    'python run_with_submitit.py --model deit_base_patch16_224 --data-path /path/to/imagenet',
    'python run_with_submitit.py --model deit_base_distilled_patch16_224 --distillation-type hard '
    '--teacher-model regnety_160 --teacher-path https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth '
    '--use_volta32',
    'python run_with_submitit.py --model deit_base_patch16_384 --batch-size 32 '
    '--finetune https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth --input-size 384 '
    '--use_volta32 --nodes 2 --lr 5e-6 --weight-decay 1e-8 --epochs 30 --min-lr 5e-6',
]


# Same code paths at a fraction of the size (the flags, --input-size included, stay): the base and
# small DeiTs are the tiny one wider, regnety_160 is regnety_002 wider.
SMALLER = {'deit_base_patch16_224': 'deit_tiny_patch16_224', 'deit_small_patch16_224': 'deit_tiny_patch16_224',
           'deit_base_patch16_384': 'deit_tiny_patch16_224', 'deit_base_distilled_patch16_224':
           'deit_tiny_distilled_patch16_224', 'deit_base_distilled_patch16_384': 'deit_tiny_distilled_patch16_224',
           'regnety_160': 'regnety_002'}


def main_argv(command: str, data_path: Path) -> list:
    """The main.py arguments of a seed command, on a local image folder in the ImageNet layout, smaller models."""
    command = re.sub(r'(--(?:teacher-)?model) (\S+)', lambda m: f'{m[1]} {SMALLER.get(m[2], m[2])}', command)
    words = shlex.split(command.replace('/path/to/imagenet', str(data_path)))
    words = words[words.index(next(w for w in words if w.endswith('.py') and w != '-m')) + 1:]
    argv, i = [], 0
    while i < len(words):
        if words[i] == '--use_volta32':
            i += 1
        elif words[i] == '--nodes':
            i += 2
        else:
            argv.append(words[i])
            i += 1
    if '--data-path' not in argv:  # the 384 evaluation relies on the original's cluster path
        argv += ['--data-path', str(data_path)]
    if '--model' not in argv:  # the default, deit_base_patch16_224
        argv += ['--model', 'deit_tiny_patch16_224']
    return argv


@pytest.mark.parametrize('command', SEED_COMMANDS, ids=range(len(SEED_COMMANDS)))
def test_seed_command_builds_its_model_and_data_pipeline(command, image_folder):
    args = parse(*main_argv(command, image_folder), '--num_workers', '0', '--device', 'cpu')
    assert args.model.startswith('deit_tiny') and args.distillation_type in ('none', 'hard')
    assert args.distillation_type == 'none' or args.teacher_model == 'regnety_002'
    main.check_args(args)
    args.distributed = False
    dataset_train, dataset_val, loader_train, loader_val, nb_classes = builders.build_data(args, torch.device('cpu'))
    assert nb_classes == 3 and len(dataset_val) == 11
    images, labels = next(iter(loader_val))
    assert images.shape == (11, 3, args.input_size, args.input_size)
    if loader_train is not None:
        image, _ = dataset_train[0]
        assert image.shape == (3, args.input_size, args.input_size)
    model = builders.create_model(args.model, args.input_size, num_classes=nb_classes, drop_rate=args.drop,
                              drop_path_rate=args.drop_path).eval()
    assert model.pos_embed.shape[1] == (args.input_size // 16) ** 2 + (2 if 'distilled' in args.model else 1)
    with torch.no_grad():
        assert model(images[:1]).shape == (1, 3)
    if args.distillation_type != 'none':
        teacher = builders.create_model(args.teacher_model, args.input_size, num_classes=nb_classes)
        assert teacher.num_classes == 3
    if args.finetune or args.resume:
        assert (args.finetune or args.resume) in models.MODEL_URLS.values()
