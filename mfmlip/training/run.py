"""``mfmlip train``: data -> statistics -> Lightning fit -> model file -> test report."""

from __future__ import annotations

import csv
import json
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from mfmlip.analysis.evaluate import evaluate, parity_plot
from mfmlip.analysis.metrics import format_table
from mfmlip.data.e0 import e0_as_dict
from mfmlip.model.serialization import save_model
from mfmlip.training.checkpoint import AtomicCheckpointIO
from mfmlip.training.config import Config, load_config, resolve_data_root
from mfmlip.training.data import make_loader, prepare_data, training_statistics
from mfmlip.training.module import MFLightningModule

MODEL_FILE = "model.pt"
OPTIM_KEYS = {"lr", "min_lr_ratio", "optimizer", "weight_decay", "max_epochs", "loss", "huber_delta", "nonfinite_loss"}
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning internals


def _model_hparams(cfg: Config, data, stats) -> dict:
    m = cfg.model
    return dict(
        species=data.species, fidelities=data.fidelities, cutoff=m.cutoff, channels=m.channels,
        lmax=m.lmax, num_layers=m.num_layers, num_radial=m.num_radial, radial_hidden=m.radial_hidden,
        envelope_p=m.envelope_p, avg_num_neighbors=stats["avg_num_neighbors"],
        fidelity_scheme=m.fidelity_scheme, fidelity_sites=tuple(m.fidelity_sites), fidelity_dim=m.fidelity_dim,
        e0=torch.as_tensor(stats["e0"]), energy_scale=stats["energy_scale"],
    )


def _trainer(cfg: Config, out: Path, n_batches: int) -> L.Trainer:
    t = cfg.training
    callbacks = [
        ModelCheckpoint(
            dirpath=out / "checkpoints", filename="best", monitor="val_loss", save_top_k=1,
            save_last=True, enable_version_counter=False,
        ),
        EarlyStopping(monitor="val_loss", patience=t.patience),
        TQDMProgressBar(refresh_rate=max(1, n_batches // 20)),
    ]
    if t.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    return L.Trainer(
        max_epochs=t.max_epochs,
        max_time={"minutes": t.max_time_minutes} if t.max_time_minutes else None,
        accelerator=t.device if t.device != "auto" else "auto",
        devices=1,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=CSVLogger(out, name="logs"),  # logs/version_N/metrics.csv, one per (resumed) fit
        inference_mode=False,
        gradient_clip_val=t.gradient_clip,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_batches)),
        default_root_dir=out,
    )


def train(config: str | Path | Config, data_root: str | Path | None = None, resume: bool = False) -> Path:
    """Train the model a config describes; return the path of the model file.

    Writes into ``output_dir``: ``model.pt`` (best validation weights),
    ``checkpoints/{best,last}.ckpt``, ``logs/version_N/metrics.csv`` (one per
    fit; a resumed run adds a version, see :func:`read_metrics`),
    ``test_metrics.json`` and ``parity_test.png`` when a test split exists.

    Raises
    ------
    ConfigError, DataError
        Invalid config or data.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    data = prepare_data(cfg, resolve_data_root(cfg, data_root))
    print("\n".join(["data:"] + [f"  {line}" for line in data.report]), flush=True)
    stats = training_statistics(data, cfg)
    hparams = _model_hparams(cfg, data, stats)
    weights = [cfg.training.weights_for(f) for f in data.fidelities]
    optim = cfg.training.model_dump(include=OPTIM_KEYS)
    module = MFLightningModule(hparams, weights, optim, cfg.model.dtype)
    module.train_sources = [s.source for s in data.splits["train"]]
    t = cfg.training
    train_loader = make_loader(data.graphs("train", cfg.model.cutoff), t.batch_size, True, t.num_workers, cfg.seed)
    val_loader = make_loader(data.graphs("val", cfg.model.cutoff), t.eval_batch_size, False, t.num_workers)
    trainer = _trainer(cfg, out, len(train_loader))
    ckpt_path = _checkpoint_to_resume(out, resume)
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)

    best = out / "checkpoints" / "best.ckpt"
    model = module.model
    if best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    meta = {
        "e0": e0_as_dict(stats["e0"], data.species, data.fidelities),
        "config": cfg.model_dump(mode="json"),
        "epochs_trained": trainer.current_epoch,
    }
    model_path = out / MODEL_FILE
    save_model(model, model_path, meta)
    print(f"model written to {model_path}", flush=True)
    if data.splits["test"]:
        _test_report(model, data, cfg, out)
    print(f"total time {time.time() - started:.0f} s", flush=True)
    return model_path


def _checkpoint_to_resume(out: Path, resume: bool) -> str | None:
    """``last.ckpt`` when resuming; a fresh run clears the logs of any earlier one."""
    last = out / "checkpoints" / "last.ckpt"
    if resume and last.is_file():
        print(f"resuming from {last}", flush=True)
        return str(last)
    if resume:
        print(f"--resume: no checkpoint at {last}; starting a new run", flush=True)
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
