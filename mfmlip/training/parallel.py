"""Training on several devices and nodes (Lightning's DDP): which process this
is, how many there are, a check of the config's strategy, the strategy
itself, and the threads of CPU processes.

``training.devices`` processes per node times ``training.num_nodes`` nodes
train together; ``batch_size`` is per process. Lightning starts the other
processes of a node itself (``mfmlip train CONFIG``), or finds them started by
``srun`` (SLURM) or ``torchrun``; see the README's "Several devices and nodes".
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback

from mfmlip.training.config import Config, ConfigError, TrainingConfig


def lead_process() -> bool:
    """Whether this is the process of global rank 0 (or the only one): the one
    that checks and writes the output folder. Read from the environment
    Lightning, SLURM or torchrun set (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``)."""
    return rank_zero_only.rank == 0


def world_size(training: TrainingConfig) -> int:
    """Processes that train together: ``devices * num_nodes`` (1 for ``devices: auto``
    on a machine without GPUs)."""
    devices = training.devices
    if devices == "auto":
        import torch

        devices = max(torch.cuda.device_count(), 1) if training.device in ("cuda", "gpu", "auto") else 1
    return devices * training.num_nodes


def check_parallel(cfg: Config) -> None:
    """``training.strategy`` is one of Lightning's, runs several processes when
    asked for several, and the config asks for nothing they cannot do.

    Raises
    ------
    ConfigError
        Names the strategy and lists Lightning's.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    t = cfg.training
    known = ["auto", *StrategyRegistry.available_strategies()]
    if t.strategy not in known:
        raise ConfigError(f"training.strategy {t.strategy!r}: not one of Lightning's strategies: {', '.join(known)}")
    if world_size(t) > 1 and t.strategy in ("single_device", "single_xla"):
        raise ConfigError(f"training.strategy {t.strategy!r} runs one process, but devices * num_nodes = "
                          f"{world_size(t)}; use ddp")
    if world_size(t) > 1 and t.nonfinite_loss == "skip":
        raise ConfigError("training.nonfinite_loss: skip works with one process only (a batch skipped in one "
                          "process leaves the others waiting for its gradients); use stop with several devices")


def strategy(training: TrainingConfig):
    """Lightning's strategy for ``training``: ``ddp`` when several processes
    train and none is named. DDP then skips its broadcast of the buffers before
    every step (an mfmlip model's buffers, E0 and the element table, do not
    change in training), and its gradients are views of the all-reduce buckets
    (no copy per step)."""
    name = training.strategy if training.strategy != "auto" or world_size(training) == 1 else "ddp"
    if name != "ddp":
        return name
    import inspect

    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.13 names the option forward_sync_buffers (broadcast_buffers is deprecated)
    known = inspect.signature(DistributedDataParallel.__init__).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    return DDPStrategy(**{sync: False}, gradient_as_bucket_view=True)


def set_process_threads(training: TrainingConfig) -> None:
    """Several CPU processes on one node share its cores: each takes ``cores //
    devices`` intra-op threads (at least 1) for the rest of the process,
    unless ``OMP_NUM_THREADS`` is set (docs/benchmarks/compile.md: the main
    job on 2 cores)."""
    import os

    import torch

    devices = training.devices if isinstance(training.devices, int) else 1
    if devices > 1 and training.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // devices))


@contextmanager
def node_processes(training: TrainingConfig, lead: bool):
    """Start the node's other processes on entry, not at ``Trainer.fit``: each reads
    the data while this one does (in the main job, 15-18 s that were spent one
    process after the other). Only the lead process of a ``ddp`` run that
    ``mfmlip train`` starts itself (not srun or torchrun) starts any, with
    Lightning's own launcher; the trainer's fit then finds them started (Lightning
    reads ``LOCAL_RANK``). An error before the fit kills them; so does a SIGTERM
    before the fit's training starts (exit 143: here by this context, within
    the fit by Lightning's handling of the exception).

    Yields
    ------
    list of subprocess.Popen : the started processes, for :func:`adopt_node_processes`.
    """
    children = _start_node_processes(training) if lead else []
    if children:  # a SIGTERM until SigtermAtStepEnd takes over: exit 143, the children killed with it
        signal.signal(signal.SIGTERM, _exit_143)
    try:
        yield children
    except BaseException:
        for child in children:
            child.kill()
        raise


def _exit_143(signum, frame):
    raise SystemExit(128 + signum)


def adopt_node_processes(trainer, children: list) -> None:
    """Give ``trainer``'s launcher the processes :func:`node_processes` started, so that
    it forwards signals to them (SIGTERM: stop at the next step; SIGKILL on errors)."""
    if children:
        trainer.strategy.launcher.procs = children


def _start_node_processes(training: TrainingConfig) -> list:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    chosen = strategy(training)
    if world_size(training) == 1 or not isinstance(chosen, DDPStrategy):
        return []
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the fit's trainer reports the devices
    try:
        launcher = L.Trainer(accelerator=training.device, devices=training.devices, num_nodes=training.num_nodes,
                             strategy=chosen, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False).strategy.launcher
    finally:
        quiet.setLevel(level)
    if launcher is None or launcher.cluster_environment.creates_processes_externally:
        return []
    launcher.launch(lambda: None)
    return list(launcher.procs)


class SigtermAtStepEnd(Callback):
    """SIGTERM in a multi-process run only marks the trainer as signalled (and, in
    the lead process, is forwarded to the node's other processes); Lightning's
    per-step broadcast of that mark then stops every process after the same
    step, and ``mfmlip train`` exits with 143 and a ``--resume`` hint.

    Lightning 2.6's own handler also broadcasts from inside the signal handler.
    When the signal lands while a process waits in another collective (the
    validation's metric sync), the processes wait for each other forever:
    1 in 3 SIGTERMs to the lead of a two-process CPU run hung (3 Dec 2026,
    Lightning 2.6.6; the deadlock Lightning-AI/pytorch-lightning#20806 and
    #20825 set out to fix). Installed at the start of each fit's training, after
    Lightning has registered its handler; Lightning restores the handlers that
    were there before the fit when it ends.
    """

    def on_train_start(self, trainer, pl_module):
        connector = trainer._signal_connector  # Lightning reads its received_sigterm at every step

        def mark(signum, frame):
            launcher = trainer.strategy.launcher
            if not connector.received_sigterm and trainer.is_global_zero and launcher is not None:
                launcher.kill(signum)
            connector.received_sigterm = True

        signal.signal(signal.SIGTERM, mark)
