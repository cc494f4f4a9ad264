"""reproduce.py's runner: main.py runs in forked children, a few at a time, each after its teacher, with progress,
an ETA, and a restart that skips what is finished."""
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

import main as deit_main

HERE = Path(__file__).resolve().parent
EXIT_FAILED = 1


@dataclass
class Run:
    name: str                      # '<variant>/seed<k>' or 'teacher_<kind>/seed<k>' ('f<fraction>/' first in a sweep)
    model: str
    epochs: int
    seed: int
    flags: List[str] = field(default_factory=list)
    teacher: Optional[str] = None  # the name of the teacher's run
    variant: str = ''              # a key of reproduce.VARIANTS, 'teacher_<kind>' or 'probe_<kind>'
    fraction: float = 0.5          # share of each digit's training scans it trains on
    warmup_epochs: int = 5


def finished(folder: Path) -> bool:
    """A run is finished when main.py exited 0: done.json, written then (the last log.txt line comes before the
    last checkpoint, so it alone does not say that checkpoint.pth is the final one)."""
    return (folder / 'done.json').exists()


def read_log(folder: Path) -> List[Dict[str, Any]]:
    log = folder / 'log.txt'
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f'{hours}h{m:02d}m' if hours else f'{m}m{s:02d}s'


class Grid:
    """Runs main.py in child processes, ``jobs`` at a time, each student after its teacher; prints progress and ETA.

    The ETA is the epochs left times the wall time per epoch trained so far in this invocation (epochs counted
    from the runs' log.txt, so runs in progress count too), each epoch weighted by the optimizer steps it holds.

    Args:
        flags: main.py's command line of a run.
    """

    def __init__(self, runs: List[Run], out: Path, jobs: int, threads: int, flags: Callable[[Run], List[str]],
                 heartbeat_s: float = 300) -> None:
        self.runs, self.out, self.jobs, self.threads, self.flags = runs, out, jobs, threads, flags
        self.heartbeat_s = heartbeat_s
        self.index = {run.name: i for i, run in enumerate(runs, 1)}
        self.processes: Dict[int, subprocess.Popen] = {}  # the runs started as new interpreters, by pid

    def folder(self, run: Run) -> Path:
        return self.out / 'runs' / run.name

    def _weight(self, run: Run) -> float:
        """Cost of one epoch of ``run``, relative to an epoch at the fraction 1/2: its share of the training images."""
        return run.fraction / 0.5

    def _work(self, run: Run, epochs: int) -> float:
        return epochs * self._weight(run)

    def _eta(self, done: float, left: float) -> str:
        if not done:
            return 'ETA after the first epoch'
        seconds = (time.time() - self.start) / done * left
        ends = time.strftime('%H:%M', time.localtime(time.time() + seconds))
        return f'about {duration(seconds)} left (ends ~{ends})'

    def _launch(self, run: Run) -> int:
        """Start `python main.py <flags>` of ``run`` in a child process; returns its pid.

        On the CPU the child is a fork of this process (run_main), which spares each run the seconds of importing
        torch and timm; CUDA does not survive a fork once the parent has touched it (torch.cuda.is_available()
        does), so on a GPU each run is a new interpreter.
        """
        folder = self.folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        flags = self.flags(run)
        with (folder / 'stdout.txt').open('a') as log:
            log.write(f'$ python main.py {" ".join(flags)}\n')
            log.flush()
            if '--device' in flags and torch.device(flags[flags.index('--device') + 1]).type != 'cpu':
                process = subprocess.Popen([sys.executable, str(HERE / 'main.py'), *flags], cwd=HERE, stdout=log,
                                           stderr=subprocess.STDOUT)
                self.processes[process.pid] = process
                return process.pid
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_main(flags, folder / 'stdout.txt', self.threads)
        return pid

    def _finish(self, run: Run, code: int, usage: Any, started: float) -> Optional[float]:
        """Write done.json of a run that exited with ``code``; returns its last evaluated top-1."""
        folder = self.folder(run)
        if code != 0:
            raise RuntimeError(f'{run.name}: main.py exited with status {code}; see {folder / "stdout.txt"}')
        log = read_log(folder)
        if not log or log[-1]['epoch'] != run.epochs - 1:
            raise RuntimeError(f'{run.name}: log.txt ends before epoch {run.epochs - 1}; see {folder / "stdout.txt"}')
        timing = folder / 'timing.json'
        done = {'wall_s': time.time() - started, 'cpu_s': usage.ru_utime + usage.ru_stime, 'threads': self.threads,
                'test_acc1': log[-1].get('test_acc1'), 'epochs': run.epochs,
                'split': json.loads(timing.read_text()) if timing.exists() else None}
        (folder / 'done.json').write_text(json.dumps(done, indent=2) + '\n')
        return done['test_acc1']

    def _todo(self) -> List[Run]:
        todo = []
        for run in self.runs:
            if finished(self.folder(run)):
                print(f'skip run {self.index[run.name]}/{len(self.runs)}: {run.name}, finished earlier '
                      f'({self.folder(run) / "done.json"})')
            else:
                todo.append(run)
        return todo

    def _logged(self, run: Run) -> int:
        return len(read_log(self.folder(run)))

    def run(self) -> int:
        """Every run not finished before, in plan order as far as teachers and ``jobs`` allow; returns how many."""
        todo = self._todo()
        count = len(todo)
        self.start = time.time()
        left = sum(self._work(r, r.epochs - self._logged(r)) for r in todo)  # work still to do
        done_work = 0.0  # work of the runs that ended in this invocation
        running: Dict[int, tuple] = {}  # pid: (run, start time, epochs logged at start)
        last_heartbeat = time.time()
        try:
            while todo or running:
                ready = [r for r in todo if not r.teacher or finished(self.out / 'runs' / r.teacher)]
                while ready and len(running) < self.jobs:
                    run = ready.pop(0)
                    todo.remove(run)
                    logged = self._logged(run)
                    print(f'start run {self.index[run.name]}/{len(self.runs)}: {run.name} ({run.model}, {run.epochs} '
                          f'epochs{f", resuming after {logged}" if logged else ""})', flush=True)
                    running[self._launch(run)] = (run, time.time(), logged)
                if not running:
                    raise RuntimeError('no run can start: a teacher is missing from the plan')
                pid, status, usage = os.wait4(-1, os.WNOHANG)
                in_progress = sum(self._work(r, self._logged(r) - n) for r, _, n in running.values())
                if pid in running:
                    run, started, logged = running.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    if pid in self.processes:  # reaped here: tell its Popen
                        self.processes.pop(pid).returncode = code
                    acc = self._finish(run, code, usage, started)
                    work = self._work(run, run.epochs - logged)
                    done_work, left, in_progress = done_work + work, left - work, in_progress - work
                    finished_runs = len(self.runs) - len(todo) - len(running)
                    eta = self._eta(done_work + in_progress, left - in_progress)
                    print(f'[{finished_runs}/{len(self.runs)} runs done] {run.name} in '
                          f'{duration(time.time() - started)}, top-1 {acc:.1f}%; {eta}', flush=True)
                elif time.time() - last_heartbeat > self.heartbeat_s:
                    last_heartbeat = time.time()
                    epochs = ', '.join(f'{r.name} epoch {self._logged(r)}/{r.epochs}' for r, _, _ in running.values())
                    print(f'[{len(self.runs) - len(todo) - len(running)}/{len(self.runs)} runs done] in progress: '
                          f'{epochs}; {self._eta(done_work + in_progress, left - in_progress)}', flush=True)
                else:
                    time.sleep(0.5)
        finally:
            for pid in running:  # stopped: each saves its step and exits (main.py's SIGTERM)
                os.kill(pid, signal.SIGTERM)
            for pid in running:
                os.waitpid(pid, 0)
        return count


class Timers:
    """Where the wall time of a main.py run goes, measured by wrapping the functions main.py calls (main.py itself is
    unchanged): start-up (from ``started``, the moment the run was launched, to its first training step),
    data loading and augmentation of the training images, the teacher's forward passes, the rest of the training
    steps (the student's forward and backward passes and the optimizer), evaluation, checkpoint (and log) writes.

    Written for reproduce.py's Time section; ``install`` patches the modules of this process, so it is meant for a
    process that runs one main.py run and exits.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.seconds = {part: 0.0 for part in PARTS}
        self.first_step: Optional[float] = None
        self.in_training = False

    def _wrap(self, owner: Any, name: str, part: Optional[str], training: Optional[bool] = None) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            counted = part is not None and (part != 'data' or self.in_training)
            previous = self.in_training
            if training is not None:
                self.in_training = training
                if training and self.first_step is None:
                    self.first_step = time.time()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.in_training = previous
                if counted:
                    self.seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def install(self) -> None:
        import builders
        import checkpoints
        import datasets

        self._wrap(deit_main, 'train_one_epoch', 'training', training=True)
        self._wrap(deit_main, 'evaluate_all', 'evaluation', training=False)
        self._wrap(checkpoints, 'save_epoch', 'checkpoints')
        self._wrap(datasets.ImageFileDataset, '__getitem__', 'data')
        build_teacher = builders.build_teacher

        def timed_teacher(*args: Any, **kwargs: Any) -> torch.nn.Module:
            teacher = build_teacher(*args, **kwargs)
            self._wrap(teacher, 'forward', 'teacher')
            return teacher

        builders.build_teacher = timed_teacher

    def split(self) -> Dict[str, float]:
        """Seconds per part; 'training step' is the training time without its data loading and teacher."""
        end = time.time()
        s = dict(self.seconds)
        s['start-up'] = (self.first_step or end) - self.started
        s['training step'] = s.pop('training') - s['data'] - s['teacher']
        s['other'] = (end - self.started) - sum(s.values())
        s['total'] = end - self.started
        return s


PARTS = ('training', 'data', 'teacher', 'evaluation', 'checkpoints')


def run_main(flags: List[str], stdout: Path, threads: int, started: Optional[float] = None) -> None:
    """In a forked child (or a new interpreter: see ``python reproduce_grid.py``): main.py's command line, its output
    appended to ``stdout``, where its time went in ``stdout``'s folder as timing.json; exits with its status.

    A fork rather than a new interpreter spares each run the seconds of importing torch and timm; the run is
    the same as `python main.py <flags>`, and main.py stops it cleanly on SIGTERM once it trains.
    """
    code = EXIT_FAILED
    timers = Timers(time.time() if started is None else started)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with stdout.open('a') as log:
            os.dup2(log.fileno(), sys.stdout.fileno())
            os.dup2(log.fileno(), sys.stderr.fileno())
        torch.set_num_threads(threads)
        timers.install()
        deit_main.cli(flags)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
    except BaseException:  # the traceback goes to the run's stdout.txt, the status to the grid
        traceback.print_exc()
    finally:
        (stdout.parent / 'timing.json').write_text(json.dumps(timers.split(), indent=2) + '\n')
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == '__main__':
    # `python reproduce_grid.py LAUNCHED STDOUT THREADS <main.py flags>`: one instrumented run in a new interpreter,
    # its start-up counted from LAUNCHED (time.time() of the launching process), imports included.
    run_main(sys.argv[4:], Path(sys.argv[2]), int(sys.argv[3]), started=float(sys.argv[1]))
