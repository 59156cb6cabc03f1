"""``mfmlip train``: data -> statistics -> Lightning fit -> model file -> test report."""

from __future__ import annotations

import csv
import json
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mfmlip import keys as K
from mfmlip.analysis.evaluate import evaluate, parity_plot
from mfmlip.analysis.metrics import format_table
from mfmlip.data.e0 import build_e0_table, composition_matrix, e0_as_dict
from mfmlip.data.store import chain, fidelity_names
from mfmlip.data.structures import read_structures
from mfmlip.model.delta import DeltaPotential
from mfmlip.model.extend import add_fidelity
from mfmlip.model.potential import MFPotential
from mfmlip.model.serialization import load_model, save_model
from mfmlip.model.inference import Predictor
from mfmlip.model.interface import Potential, fidelity_index
from mfmlip.model.sevennet import is_sevenn_name
from mfmlip.model.spec import ModelSpec
from mfmlip.training.checkpoint import AtomicCheckpointIO, LastCheckpointEveryEpoch
from mfmlip.training.checks import check_device, check_training_fidelities, label_counts
from mfmlip.training.config import Config, ConfigError, load_config, resolve_data_root
from mfmlip.training.ema import ExponentialAverage
from mfmlip.training.data import (
    EpochShuffle, GraphDataModule, average_neighbors, epoch_passes, prepare_data, subtract_base, training_statistics,
)
from mfmlip.training.module import MFLightningModule
from mfmlip.training.progress import EpochSummary, progress_callback
from mfmlip.training.parallel import (
    SigtermAtStepEnd, adopt_node_processes, check_parallel, lead_process, node_processes, set_process_threads, strategy,
    world_size,
)
from mfmlip.training.replay import replay_splits
from mfmlip.training.sampler import FidelityShareSampler, RankShard, TwoStageOrder
from mfmlip.training.rundir import prepare_output_dir, write_run_config

MODEL_FILE = "model.pt"
REPLAY_GROUP = -1  # sampler group of the replay structures (fidelity indices are >= 0)
E0_FIT_STRUCTURES = 16  # structures of a new fidelity that its E0 is fitted on (a pass of the model each)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning internals
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer`")  # ours casts the dtype
# DDP with training.compile: the compiled backward gives a (1, k) weight's gradient other (equally valid)
# strides than its bucket's, and DDP copies those k numbers
warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides")


def _fresh_model(cfg: Config, data, stats, avg_num_neighbors: float) -> MFPotential:
    """A new potential: the config's architecture, the data's species and fidelities."""
    spec = ModelSpec(**cfg.model.model_dump(exclude={"dtype"}), species=data.species,
                     fidelities=data.fidelities, avg_num_neighbors=avg_num_neighbors)
    return MFPotential(spec, e0=torch.as_tensor(stats["e0"]), energy_scale=stats["energy_scale"])


def _init_from_model(cfg: Config, data) -> tuple[Potential, list[str]]:
    """``training.init_from`` (a model file or a name such as ``sevenn:7net-mf-0``)
    extended by the data's new fidelities, each a copy of ``training.new_fidelity_like``
    (one name for all, or ``{new: existing}``); and the fidelities the model had."""
    base = load_model(cfg.training.init_from, dtype=torch.float64)
    unknown = sorted(set(data.species) - set(base.species))
    if unknown:
        raise ConfigError(
            f"training.init_from {cfg.training.init_from}: the data has elements {unknown} "
            f"(atomic numbers) the model does not know; it knows {sorted(base.species)}"
        )
    original = list(base.fidelities)
    new = [f for f in data.fidelities if f not in original]
    like = _like_per_fidelity(cfg.training.new_fidelity_like, new, original)
    for name in new:
        base = add_fidelity(base, name, like=like[name])
    train = [s for s in data.splits["train"] if s.fidelity in new]
    for name in new:
        _fit_new_e0(base, [s for s in train if s.fidelity == name], name, cfg)
    return base, original


def _like_per_fidelity(like: str | dict[str, str] | None, new: list[str], original: list[str]) -> dict:
    """``training.new_fidelity_like`` as ``{new fidelity: existing fidelity or None}``.

    Raises
    ------
    ConfigError
        A mapping that misses a new fidelity, names one the data does not add,
        or copies a fidelity the ``init_from`` model does not have.
    """
    if not isinstance(like, dict):
        like = dict.fromkeys(new, like)
    elif set(like) != set(new):
        raise ConfigError(f"training.new_fidelity_like: maps {sorted(like)}, but the new fidelities are {new}")
    unknown = sorted({v for v in like.values() if v is not None} - set(original))
    if unknown:
        raise ConfigError(f"training.new_fidelity_like: {unknown} not among init_from's fidelities {original}")
    return like


def _fit_new_e0(model: Potential, structures: list, name: str, cfg: Config) -> None:
    """Set the E0 row of the new fidelity ``name`` from its training structures
    (at most :data:`E0_FIT_STRUCTURES`, evenly spaced): the least-squares E0 of
    the labels minus the network's prediction without E0 (the network is still
    a copy of ``new_fidelity_like``), so the new fidelity starts as close to
    its data as an E0 shift allows. Elements absent from the data keep the
    copied row; ``data.e0`` given for ``name`` is taken as it is."""
    if name in cfg.data.e0:
        table = build_e0_table(structures, model.species, [name], cfg.data.e0, cfg.data.e0_ridge)
    else:
        labelled = [s for s in structures if np.isfinite(s.energy)]
        step = max(1, -(-len(labelled) // E0_FIT_STRUCTURES))
        subset = labelled[::step]
        row = model.fidelity_index(name)
        e0_now = composition_matrix(subset, model.species) @ model.e0_table()[row]
        network = np.concatenate([p[K.ENERGY].double().cpu().numpy() for _, _, p in
                                  Predictor(model, name).predict(subset, cfg.training.eval_batch_size, forces=False)])
        residual = [replace(s, energy=s.energy - (e - e0)) for s, e, e0 in zip(subset, network, e0_now, strict=True)]
        table = build_e0_table(residual, model.species, [name], {}, cfg.data.e0_ridge)
    present = sorted({int(z) for s in structures for z in s.atomic_numbers})
    cols = model.species_index(torch.tensor(present))
    with torch.no_grad():
        model.e0[model.fidelity_index(name), cols] = torch.as_tensor(table[0], dtype=model.e0.dtype)[cols]


def freeze(model: torch.nn.Module, prefixes: list[str]) -> None:
    """Stop training the parameters under the named submodules (e.g. ``embedding``,
    ``blocks.0``), as in transfer learning (Ko & Ong 2025 froze the embedding).

    Raises
    ------
    ConfigError
        A name matches no parameter.
    """
    for prefix in prefixes:
        hits = [p for n, p in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            top = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
            raise ConfigError(f"training.freeze: {prefix!r} matches no parameter; top-level modules: {top}")
        for p in hits:
            p.requires_grad_(False)


def _trainer(cfg: Config, out: Path, n_batches: int) -> L.Trainer:
    t = cfg.training
    callbacks = [
        ModelCheckpoint(
            dirpath=out / "checkpoints", filename="best", monitor=t.monitor, save_top_k=1,
            save_last=True, enable_version_counter=False,
        ),
        EarlyStopping(monitor=t.monitor, patience=t.patience),
        progress_callback(n_batches),
    ]
    if world_size(t) > 1:
        callbacks.append(SigtermAtStepEnd())
    if t.ema_decay:
        callbacks.append(ExponentialAverage(t.ema_decay))
    # step-wise validation; a max_steps budget shorter than an epoch validates once, at its end
    interval = t.val_interval_steps or (t.max_steps if t.max_steps and t.max_steps < n_batches else None)
    if not interval:  # with step-wise validation, last.ckpt follows the validations
        callbacks.append(LastCheckpointEveryEpoch())
    every = {"check_val_every_n_epoch": None, "val_check_interval": interval} if interval else {}
    return L.Trainer(
        max_epochs=t.max_epochs,
        max_steps=t.max_steps or -1,
        **every,
        max_time={"minutes": t.max_time_minutes} if t.max_time_minutes else None,
        accelerator=t.device,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy(t),
        use_distributed_sampler=False,  # each process draws its RankShard of the global order
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=CSVLogger(out, name="logs"),  # logs/version_N/metrics.csv, one per (resumed) fit
        inference_mode=False,
        gradient_clip_val=t.gradient_clip,
        enable_model_summary=False,
        enable_progress_bar=not any(isinstance(c, EpochSummary) for c in callbacks),
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_batches)),
        default_root_dir=out,
    )


def train(
    config: str | Path | Config, data_root: str | Path | None = None, resume: bool = False,
    reader=read_structures, overwrite: bool = False,
) -> Path:
    """Train the model a config describes; return the path of the model file.

    ``reader`` replaces :func:`mfmlip.data.read_structures` (a study passes a
    cached one so its runs parse each file once).

    Writes into ``output_dir``: ``model.pt`` (best validation weights),
    ``checkpoints/{best,last}.ckpt``, ``logs/version_N/metrics.csv`` (one per
    fit; a resumed run adds a version, see :func:`read_metrics`),
    ``test_metrics.json`` and ``parity_test.png`` when a test split exists,
    and ``config.yaml`` (the resolved config) before training starts.

    An ``output_dir`` that holds an earlier run is refused unless ``resume``
    (the config may not change the model or the data) or ``overwrite`` (the
    earlier run is deleted); see :mod:`mfmlip.training.rundir`.

    Raises
    ------
    ConfigError, DataError
        Invalid config or data, a device this machine lacks, or an output_dir
        holding an earlier run.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    for key in ("init_from", "delta_from"):
        given = getattr(cfg.training, key)
        if given and not is_sevenn_name(given) and not Path(given).is_file():
            raise ConfigError(f"training.{key}: model file {given} not found")
    if cfg.training.replay and not cfg.training.init_from:
        raise ConfigError("training.replay needs training.init_from: the model whose fidelities are replayed")
    out, root = Path(cfg.output_dir), resolve_data_root(cfg, data_root)
    check_device(cfg)
    check_parallel(cfg)
    set_process_threads(cfg.training)
    lead = lead_process()
    if lead:  # before the other processes of a multi-process run start
        prepare_output_dir(cfg, out, root, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    with node_processes(cfg.training, lead) as children:  # they read the data while this process does
        data, base, module, loaders, trainer = _setup_fit(cfg, out, root, reader, lead)
        adopt_node_processes(trainer, children)
        ckpt_path = _checkpoint_to_resume(out, resume, lead)
    try:
        trainer.fit(module, datamodule=loaders, ckpt_path=ckpt_path)
    except SIGTERMException:
        print(f"stopped by SIGTERM; continue with: mfmlip train {cfg.path or 'CONFIG'} --resume", flush=True)
        raise SystemExit(143) from None
    if not trainer.is_global_zero:  # one process writes the model and the test report
        return out / MODEL_FILE

    best = out / "checkpoints" / "best.ckpt"
    if best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    model = module.model
    if base is not None:
        model = DeltaPotential(base[0].to(model.dtype), base[1], model)
    meta = {
        "e0": e0_as_dict(model.e0_table(), model.species, model.fidelities),
        "config": cfg.model_dump(mode="json"),
        "epochs_trained": trainer.current_epoch,
        "steps_trained": trainer.global_step,
        "training_data": _label_counts(data.splits["train"]),
    }
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FloatingPointError(f"training diverged: no finite weights to save (see {out / 'logs'})")
    model_path = out / MODEL_FILE
    save_model(model, model_path, meta)
    print(f"model written to {model_path}", flush=True)
    if data.splits["test"]:
        _test_report(model, data, cfg, out)
    print(f"total time {time.time() - started:.0f} s", flush=True)
    return model_path


def _setup_fit(cfg: Config, out: Path, root: Path, reader, lead: bool):
    """The data, the delta base (or None), the Lightning module, its data module and the trainer."""
    data = prepare_data(cfg, root, reader)
    if not cfg.training.init_from:  # else once the model's fidelities are known
        check_training_fidelities(cfg.training, data.fidelities)
    if lead:
        write_run_config(cfg, out, root)
        print("\n".join(["data:"] + [f"  {line}" for line in data.report]), flush=True)
    base = _delta_base(cfg, data)
    stats = training_statistics(data, cfg)
    initial, original = _init_from_model(cfg, data) if cfg.training.init_from else (None, [])
    n_own = len(data.splits["train"])
    if initial is not None:
        check_training_fidelities(cfg.training, initial.fidelities)
        data.fidelities = initial.fidelities  # graphs index the model's fidelity list
        _add_replay(cfg, data, initial.to(getattr(torch, cfg.model.dtype)), original, root, reader)
    cutoff = initial.cutoff if initial is not None else cfg.model.cutoff
    t = cfg.training
    train_set = data.dataset("train", cutoff)
    model = initial if initial is not None else _fresh_model(cfg, data, stats, average_neighbors(train_set))
    weights = [[t.weights_for(f, stage) for f in data.fidelities] for stage in (1, 2)]
    # train mode: a loaded init_from model comes in eval mode, whose forces keep no graph
    module = MFLightningModule(model.to(getattr(torch, cfg.model.dtype)).train(), t, *weights)
    freeze(module.model, t.freeze)
    module.train_structures = data.splits["train"]
    order = _train_order(cfg, data, train_set, n_own)
    loaders = GraphDataModule(train_set, data.dataset("val", cutoff), order, t.batch_size, t.eval_batch_size,
                              t.num_workers)
    trainer = _trainer(cfg, out, len(RankShard(order, t.batch_size, 0, world_size(t))) // t.batch_size)
    return data, base, module, loaders, trainer


def _add_replay(cfg: Config, data, model: Potential, original: list[str], root: Path, reader) -> None:
    """Append the replay structures (:mod:`mfmlip.training.replay`) to the train and val
    splits; ``original``: the fidelities of ``init_from`` (the default replay fidelities)."""
    if not cfg.training.replay:
        return
    started = time.time()
    parts = replay_splits(cfg.training.replay, model, original, data.splits["train"], data.species, root,
                          cfg.training.eval_batch_size, reader)
    for split, structures in parts.items():
        data.splits[split] = chain([data.splits[split], structures])
    print(f"replay: {len(parts['train'])} training and {len(parts['val'])} validation labels from "
          f"{cfg.training.init_from} in {time.time() - started:.0f} s", flush=True)


def _train_order(cfg: Config, data, train_set, n_own: int):
    """The sampler of an epoch's training draws, the same in every process: the
    :class:`FidelityShareSampler` of ``training.sampling`` and ``training.replay``,
    else a shuffle; with ``training.stage_two.sampling``, a :class:`TwoStageOrder`
    that switches to that sampling's draws. The replay structures (after the first
    ``n_own``) form one group of share ``replay.share``; the user's fidelities share
    the rest, by ``training.sampling`` or else by count. A step-budgeted run with
    step-wise validation has epochs of at least one validation interval of global batches.

    Raises
    ------
    ConfigError
        A training fidelity without a share (unknown names are refused before,
        by :func:`~mfmlip.training.checks.check_training_fidelities`).
    """
    t = cfg.training
    n, batch = len(train_set), t.batch_size * world_size(t)
    passes = epoch_passes(n, batch, t.val_interval_steps or 1)
    first = _shares_order(cfg, data, train_set, n_own, t.sampling, "training.sampling", passes)
    if t.stage_two is None or not t.stage_two.sampling:
        return first
    second = _shares_order(cfg, data, train_set, n_own, t.stage_two.sampling, "training.stage_two.sampling",
                           passes)
    return TwoStageOrder(first, second, t.stage_two.start_epoch)


def _shares_order(cfg: Config, data, train_set, n_own: int, sampling: dict, key: str, passes: int):
    """One epoch's draws (``passes`` times the training set's size) of one sampling
    (``{fidelity: share}``, empty: by count) and of the replay group."""
    t = cfg.training
    n = len(train_set)
    if not sampling and not t.replay:
        return EpochShuffle(n, cfg.seed, passes)
    own = fidelity_names(data.splits["train"])[:n_own]
    present = sorted(set(own))
    missing = sorted(set(present) - set(sampling))
    if sampling and missing:
        raise ConfigError(f"{key}: no share for {missing} (training fidelities: {present})")
    shares = sampling or {f: own.count(f) / n_own for f in present}
    kept = 1.0 - (t.replay.share if t.replay else 0.0)
    groups = {fidelity_index(data.fidelities, f): share * kept for f, share in shares.items()}
    labels = train_set.fidelity_indices()[:n_own]
    if t.replay and n > n_own:
        groups[REPLAY_GROUP] = t.replay.share
        labels += [REPLAY_GROUP] * (n - n_own)
    return FidelityShareSampler(labels, groups, num_samples=n * passes, seed=cfg.seed)


def _label_counts(structures) -> dict:
    """``{fidelity: {"structures", "energy", "forces", "stress"}}``: how many training
    structures of each fidelity, and how many carry each label (one pass)."""
    counts = {}
    for s in structures:
        c = counts.setdefault(s.fidelity, {"structures": 0, **label_counts([])})
        for name, n in {"structures": 1, **label_counts([s])}.items():
            c[name] += n
    return counts


def _delta_base(cfg: Config, data) -> tuple | None:
    """With ``training.delta_from``: the base model and fidelity, after replacing
    the training and validation labels by their residuals (the test split keeps
    its labels: the saved model is the sum).

    Raises
    ------
    ConfigError
        ``delta_from`` combined with ``init_from``, or an unknown ``delta_fidelity``.
    """
    t = cfg.training
    if not t.delta_from:
        return None
    if t.init_from:
        raise ConfigError("training.delta_from and training.init_from exclude each other")
    base = load_model(t.delta_from, dtype=torch.float64)
    fidelity = t.delta_fidelity or base.fidelities[0]
    if fidelity not in base.fidelities:
        raise ConfigError(f"training.delta_fidelity {fidelity!r}: {t.delta_from} has {base.fidelities}")
    for split in ("train", "val"):
        data.splits[split] = subtract_base(data.splits[split], base, fidelity, t.eval_batch_size)
    print(f"delta-learning: labels minus {t.delta_from} at {fidelity}", flush=True)
    return base, fidelity


def _checkpoint_to_resume(out: Path, resume: bool, lead: bool = True) -> str | None:
    """``last.ckpt`` when resuming; a fresh run clears the logs of any earlier one
    (in the lead process only)."""
    last = out / "checkpoints" / "last.ckpt"
    if resume and last.is_file():
        if lead:
            print(f"resuming from {last}", flush=True)
        return str(last)
    if resume and lead:
        print(f"--resume: no checkpoint at {last}; starting a new run", flush=True)
    if lead:
        shutil.rmtree(out / "logs", ignore_errors=True)
    return None


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Rows of every ``logs/version_N/metrics.csv`` of a run, oldest fit first."""
    files = sorted(Path(output_dir, "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    rows = []
    for path in files:
        with open(path, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def _test_report(model, data, cfg: Config, out: Path) -> dict:
    metrics, pairs = evaluate(model, data.splits["test"], batch_size=cfg.training.eval_batch_size)
    print(format_table(metrics, "test metrics (each structure at its own fidelity):"), flush=True)
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    parity_plot(pairs, out / "parity_test.png", "test split")
    return metrics
