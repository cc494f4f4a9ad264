"""Run main.py as a Slurm job through submitit, requeued from its last checkpoint on preemption or timeout.

    python run_with_submitit.py --model deit_base_patch16_224 --data-path /path/to/imagenet
    python run_with_submitit.py --cluster local --ngpus 2 --device cpu --data-set DIGITS --input-size 32 ...

Takes every flag of main.py plus the job's (``--help`` lists them). Each task of the job is one
training process (one per GPU); it reads its rank, local rank and world size from submitit's job
environment, meets the others at the first node of the job (MASTER_ADDR / MASTER_PORT) and runs
main.main. All tasks write to one output folder, by default the job folder (``%j`` is the job id).
When Slurm signals the coming time limit or a preemption, rank 0 requeues the same training with
``--resume <output_dir>/checkpoint.pth``: the requeued job continues after the last complete epoch.
``--cluster local`` runs the job on this machine with submitit's local executor and waits for it.
"""
import argparse
import copy
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import submitit
import torch
import torch.distributed as dist
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment

import main as deit_main

CLUSTERS = ('slurm', 'local', 'debug')
CODE_DIR = Path(__file__).resolve().parent


def get_args_parser(cluster: str = 'slurm') -> argparse.ArgumentParser:
    """main.py's flags and the job's; the defaults of --ngpus, --nodes and --device depend on ``cluster``."""
    parser = deit_main.FlagParser('Submitit launcher for DeiT', parents=[deit_main.get_args_parser()])
    if cluster == 'slurm':
        # Jobs are submitted from login nodes, which often have no GPU: main.py's default (cpu there)
        # would ask the compute nodes for CPU training.
        parser.set_defaults(device='cuda')

    group = parser.add_argument_group('Job')
    group.add_argument('--cluster', default='slurm', choices=CLUSTERS,
                       help='slurm submits the job and returns; local runs it on this machine with submitit\'s '
                            'local executor (same tasks, signals and requeue) and waits for it; debug runs one '
                            'process inside this one, with pdb on error (default: %(default)s)')
    local_gpus = torch.cuda.device_count() or 1
    group.add_argument('--ngpus', '--gpu', default={'slurm': 8, 'local': local_gpus}.get(cluster, 1), type=int,
                       help='GPUs per node (--gpu: the spelling of DeiT III\'s commands), one training process '
                            'each; with --device cpu, processes per node '
                            '(default: %(default)s; 8 on Slurm, the GPUs of this machine or 1 with --cluster local)')
    group.add_argument('--nodes', default=2 if cluster == 'slurm' else 1, type=int,
                       help='number of nodes (default: %(default)s; 2 on Slurm, 1 otherwise)')
    group.add_argument('--timeout', default=2800, type=int,
                       help='time limit of the job in minutes (default: %(default)s); when it comes, the job '
                            'requeues itself and resumes')
    group.add_argument('--signal-delay', default=120, type=int, metavar='SECONDS',
                       help='how long before the time limit the job is signalled to requeue (default: %(default)s)')
    group.add_argument('--max-requeues', default=10, type=int, metavar='N',
                       help='requeues after preemption or timeout before the job gives up (default: %(default)s); '
                            'the local executor restarts a job at most 5 times')
    group.add_argument('--job_dir', '--job-dir', default=os.path.join(os.environ.get('DEIT_JOB_DIR', 'jobs'), '%j'),
                       help='folder of the job\'s logs and submitit files, %%j is the job id; also the output '
                            'folder unless --output_dir is given (default: $DEIT_JOB_DIR/%%j if set, else ./jobs/%%j; '
                            'here %(default)s). On Slurm it must be on a file system all nodes share')

    group = parser.add_argument_group('Slurm resources', 'used by --cluster slurm')
    group.add_argument('--partition', default=None, help='partition (default: the cluster\'s default partition)')
    group.add_argument('--account', default=None, help='account to charge (default: your default account)')
    group.add_argument('--qos', default=None, help='quality of service (default: the cluster\'s)')
    group.add_argument('--constraint', default=None,
                       help='required node features, e.g. "a100" or "a100&ib" (default: none)')
    group.add_argument('--use_volta32', '--use-volta32', action='store_true',
                       help='add the constraint volta32gb: 32 GB V100 GPUs (default: off)')
    group.add_argument('--comment', default=None, help='comment attached to the job (default: none)')
    group.add_argument('--cpus-per-task', default=10, type=int,
                       help='CPU cores per training process, for its data loading workers (default: %(default)s)')
    group.add_argument('--mem-per-gpu', default=40, type=int, metavar='GB',
                       help='memory per training process in GB; the job asks for --ngpus times this per node '
                            '(default: %(default)s)')
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; paths become absolute and --output_dir defaults to --job_dir."""
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument('--cluster', default='slurm')
    parser = get_args_parser(cluster.parse_known_args(argv)[0].cluster)
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.job_dir = str(Path(args.job_dir).expanduser().absolute())
    args.output_dir = str(Path(args.output_dir).expanduser().absolute()) if args.output_dir else args.job_dir
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (one line, exit status 2) on a job that cannot run, before it waits in a queue."""
    if args.ngpus < 1 or args.nodes < 1:
        parser.error('--ngpus and --nodes must be positive')
    if args.max_requeues < 0 or args.timeout < 1 or not 0 <= args.signal_delay < 60 * args.timeout:
        parser.error('--max-requeues must be >= 0, --timeout >= 1 minute, and --signal-delay between 0 and the '
                     'time limit in seconds')
    if args.cluster == 'local' and args.nodes > 1:
        parser.error(f'--cluster local runs on this machine only: --nodes {args.nodes} needs --cluster slurm')
    if args.cluster == 'debug' and args.nodes * args.ngpus > 1:
        parser.error('--cluster debug runs one process inside this one: use --nodes 1 --ngpus 1, or --cluster local')
    if args.cluster == 'slurm' and not (shutil.which('sbatch') and shutil.which('srun')):
        parser.error('--cluster slurm needs Slurm\'s sbatch and srun, which are not on PATH; to run on this '
                     'machine: --cluster local --nodes 1')
    if args.cluster != 'slurm' and torch.device(args.device).type == 'cuda' and \
            args.ngpus > torch.cuda.device_count():
        parser.error(f'--ngpus {args.ngpus} but this machine has {torch.cuda.device_count()} GPU(s): lower --ngpus, '
                     'or use --device cpu (--ngpus is then the number of processes)')
    # main.py's own checks, now rather than after hours in the queue; whether a GPU is visible is for
    # the compute nodes to say.
    try:
        deit_main.check_args(argparse.Namespace(**{**vars(args), 'device': 'cpu'}))
    except ValueError as e:
        parser.error(str(e))


def expand_job_id(path: str, job_id: str) -> str:
    """``path`` with ``%j`` replaced by the job id, as Slurm and submitit do."""
    return path.replace('%j', job_id)


class Trainer:
    """What each task of the job runs; submitit pickles it, and calls checkpoint() when Slurm signals."""

    def __init__(self, args: argparse.Namespace, requeues: int = 0) -> None:
        self.args = args
        self.requeues = requeues

    def __call__(self) -> None:
        """Run main.main as rank ``global_rank`` of the job's ``num_tasks`` processes."""
        job_env = submitit.JobEnvironment()
        # main.main fills in args (rank, scaled lr, start epoch); a requeue must start from the flags again.
        args = copy.deepcopy(self.args)
        args.output_dir = expand_job_id(args.output_dir, job_env.job_id)
        # env:// rendezvous at the first node of the job, on a port drawn from the job id (or $MASTER_PORT);
        # on a single node the loopback address, which works even where the host name does not resolve.
        dist_env = TorchDistributedEnvironment()
        if job_env.num_nodes == 1:
            dist_env.master_addr = '127.0.0.1'
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        print(f'Job {job_env.job_id}: rank {dist_env.rank} of {dist_env.world_size} (local rank '
              f'{dist_env.local_rank}), rendezvous {dist_env.master_addr}:{dist_env.master_port}, output '
              f'{args.output_dir}, requeues so far {self.requeues}', flush=True)
        deit_main.main(args)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def checkpoint(self) -> Optional[DelayedSubmission]:
        """The same training, resuming from ``<output_dir>/checkpoint.pth``; None after --max-requeues.

        submitit calls this on rank 0 when the job receives its preemption / timeout signal, then
        requeues the job with what it returns. The training is not saved here: checkpoint.pth of the
        last complete epoch is the resume point, so at most the epoch in progress is trained again.
        """
        if self.requeues >= self.args.max_requeues:
            print(f'Not requeuing: the job was requeued {self.requeues} times (--max-requeues '
                  f'{self.args.max_requeues})', flush=True)
            return None
        args = copy.deepcopy(self.args)
        checkpoint = Path(expand_job_id(args.output_dir, submitit.JobEnvironment().job_id)) / 'checkpoint.pth'
        if checkpoint.exists() and not args.eval:
            args.resume = str(checkpoint)
        print(f'Requeuing ({self.requeues + 1} of at most {args.max_requeues}), resuming from '
              f'{args.resume or "scratch"}', flush=True)
        return DelayedSubmission(type(self)(args, self.requeues + 1))


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    """The executor of --cluster, with the job's resources and the requeue bound."""
    if args.cluster == 'debug':
        return submitit.DebugExecutor(args.job_dir)
    gpus = args.ngpus if torch.device(args.device).type == 'cuda' else 0
    if args.cluster == 'local':
        executor = submitit.LocalExecutor(args.job_dir, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=args.ngpus, gpus_per_node=gpus,
                                   signal_delay_s=args.signal_delay)
        return executor
    constraint = '&'.join(c for c in (args.constraint, 'volta32gb' if args.use_volta32 else None) if c)
    executor = submitit.AutoExecutor(args.job_dir, cluster='slurm', slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(
        name='deit', timeout_min=args.timeout, nodes=args.nodes, tasks_per_node=args.ngpus,
        gpus_per_node=gpus or None, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_per_gpu * args.ngpus,
        slurm_signal_delay_s=args.signal_delay, slurm_partition=args.partition, slurm_account=args.account,
        slurm_qos=args.qos, slurm_constraint=constraint or None, slurm_comment=args.comment)
    return executor


def main(argv: Optional[List[str]] = None) -> None:
    """Submit the training; with --cluster local or debug, wait for it and exit with its outcome."""
    args = parse_args(argv)
    executor = build_executor(args)
    # The job's Python unpickles the Trainer, which imports main.py: let it find this checkout
    # whatever directory the job starts in (sbatch and the local executor pass the environment on).
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (str(CODE_DIR), os.environ.get('PYTHONPATH')) if p)
    if args.cluster == 'local':
        # As torchrun does: the processes share this machine's cores, and torch's default of all cores in
        # each process oversubscribes them (training on CPU ran several times slower).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
        os.environ.setdefault('OMP_NUM_THREADS', str(max(1, cores // args.ngpus)))
    job = executor.submit(Trainer(args))
    print(f'Submitted job_id: {job.job_id}')
    print(f'{args.nodes} node(s) x {args.ngpus} process(es) on {args.device}; logs in '
          f'{expand_job_id(args.job_dir, job.job_id)}, output in {expand_job_id(args.output_dir, job.job_id)}',
          flush=True)
    if args.cluster == 'slurm':
        return
    try:
        job.results()
    except KeyboardInterrupt:
        job.cancel()
        sys.exit(f'Cancelled job {job.job_id}')
    except (FailedJobError, UncompletedJobError) as e:
        reason = str(e).strip().splitlines()[-1]
        sys.exit(f'Job {job.job_id} failed: {reason} (see {job.paths.stderr} and {job.paths.stdout})')
    print(f'Job {job.job_id} finished')


if __name__ == '__main__':
    main()
