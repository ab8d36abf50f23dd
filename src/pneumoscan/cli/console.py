"""What the command line tools (the CLI, the demo, the benchmarks) show while they work.

Logging goes to stderr once, Lightning's lines included; long steps show tqdm bars on a terminal
and a log line every 10% otherwise (a CI job, ``nohup``, a pipe), so a redirected run still says
how far it got; and a run's log can be kept in its folder (``RUN/train.log``) even when that folder
is only created halfway through. The library logs and never prints; these helpers decide where
its lines go. Nothing here imports torch or Lightning until it is needed.
"""

from __future__ import annotations

import logging
import sys
import warnings
from datetime import datetime
from pathlib import Path

log = logging.getLogger("pneumoscan")
progress_log = logging.getLogger("pneumoscan.progress")

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
QUIET_LOGGERS = ("matplotlib", "PIL")
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_auc")  # the epoch line; all if none logged
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TIMESTAMPED_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class IsoFormatter(logging.Formatter):
    """``%(asctime)s`` as ISO 8601 with milliseconds and the UTC offset (2025-01-31T14:05:09.123+01:00):
    unambiguous across time zones and daylight saving, and sorted as text."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def configure_logging(verbose: bool = False, *, timestamps: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr, one line per message, Lightning's included once.

    ``timestamps`` (the server: its lines are read later, next to other systems' logs) prefixes each
    line with an ISO-8601 time, the level and the logger; a command run at a terminal does without.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(IsoFormatter(TIMESTAMPED_FORMAT) if timestamps else logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    route_lightning_logs()
    if not verbose:
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def route_lightning_logs() -> None:
    """Send Lightning's log lines through our handlers only, so each prints once.

    Importing ``lightning`` adds its own stderr handler (and ``lightning.pytorch`` another when the
    root logger has none yet) while the records also propagate to ours: every INFO line printed
    twice, once as "INFO: ...". Call after Lightning is imported (``configure_logging`` does, if it
    already is; the CLI again after importing the training modules); harmless before and repeated.
    """
    if not any(name in sys.modules for name in LIGHTNING_LOGGERS):
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not isinstance(handler, RunLog):
                logger.removeHandler(handler)
        logger.propagate = True


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 unreadable file', '3 unreadable files'."""
    return f"{n} {word if n == 1 else many or word + 's'}"


class StageBars:
    """Progress for the library's ``(stage, done, total)`` callbacks: a tqdm bar per stage on a
    terminal; otherwise a log line each ``every`` of the way (10%), or each ``unknown_every``
    items when the total is not known (``total`` 0)."""

    def __init__(self, *, every: float = 0.1, unknown_every: int = 500, tty: bool | None = None):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every, self.unknown_every = every, unknown_every
        self.bars: dict = {}
        self.logged: dict[str, int] = {}  # stage -> last step logged

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.tty:
            self._bar(stage, done, total)
        else:
            self._log(stage, done, total)

    def _bar(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(desc=stage, total=total or None, unit="img", leave=False, file=sys.stderr)
        bar = self.bars[stage]
        bar.update(done - bar.n)

    def _log(self, stage: str, done: int, total: int) -> None:
        if total:
            step = int(done / total / self.every + 1e-9) if done < total else round(1 / self.every)
            if step > self.logged.get(stage, 0):
                progress_log.info("%s: %d%% (%d/%d)", stage, min(100, round(100 * done / total)), done, total)
        else:
            step = done // self.unknown_every
            if step > self.logged.get(stage, 0):
                progress_log.info("%s: %d", stage, done)
        self.logged[stage] = max(step, self.logged.get(stage, 0))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class RunLog(logging.Handler):
    """The log of a run, for a file in a folder that may not exist yet.

    Records are held in memory until ``attach(path)``, then written there (appending, so a resumed
    run keeps its history) with everything that came before; never attached, they are dropped.
    Added to the root logger by ``start_run_log``; ``close()`` removes it.
    """

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.buffer: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        else:
            self.buffer.append(record)

    def attach(self, path: str | Path) -> Path:
        """Start writing to ``path`` (its folder must exist); a second call keeps the first file."""
        if self.file is None:
            self.path = Path(path)
            self.file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
            self.file.setFormatter(self.formatter)
            for record in self.buffer:
                self.file.emit(record)
            self.buffer.clear()
        return self.path

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        if self.file is not None:
            self.file.close()
        self.buffer.clear()
        super().close()


def start_run_log(level: int | None = None) -> RunLog:
    """A RunLog on the root logger, holding lines until the caller knows the run folder."""
    handler = RunLog(logging.getLogger().getEffectiveLevel() if level is None else level)
    logging.getLogger().addHandler(handler)
    return handler


def log_to_file(path: str | Path, level: int | None = None) -> RunLog:
    """Keep the log in ``path`` from now on (appending); ``close()`` the result to stop."""
    handler = start_run_log(level)
    handler.attach(path)
    return handler


def training_callbacks(run_log: RunLog | None = None, *, tty: bool | None = None) -> list:
    """Lightning callbacks for a CLI training run: tqdm bars on a terminal, else one log line per
    epoch; and, with ``run_log``, the log attached to ``RUN/train.log`` once the run folder exists
    (the Trainer's ``default_root_dir``, created before ``trainer.fit``), on global rank 0 only."""
    from lightning.pytorch.callbacks import Callback, TQDMProgressBar

    route_lightning_logs()
    tty = sys.stderr.isatty() if tty is None else tty

    class EpochLog(Callback):
        """One line per epoch with its metrics, for logs that are not a terminal."""

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                found = {k: float(v) for k, v in trainer.callback_metrics.items()}
                keys = [k for k in EPOCH_METRICS if k in found] or sorted(found)
                shown = ", ".join(f"{k} {found[k]:.4f}" for k in keys)
                log.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs, shown)

    class AttachRunLog(Callback):
        def setup(self, trainer, pl_module, stage: str) -> None:
            if trainer.is_global_zero and run_log is not None:
                run_log.attach(Path(trainer.default_root_dir) / "train.log")

    return [TQDMProgressBar() if tty else EpochLog(), *([AttachRunLog()] if run_log is not None else [])]

