"""Datasets, transforms, samplers and loaders for training and evaluation."""
from __future__ import annotations

import atexit
import functools
import itertools
import logging
import logging.handlers
import os
import select
import signal
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data import auto_augment
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from yacs.config import CfgNode as CN

from config import mixup_enabled
from startup import STOP_SIGNALS
from utils import get_rank, get_world_size

from .common import WORKER_CONTEXT, DataError, ImageFolderDataset
from .samplers import ResumableSampler, SeededSamples, ShardSampler

# DATA.DATASET values of segmentation runs (main_seg.py, configs/seg/).
SEGMENTATION_DATASETS = ("ade20k", "digits_seg")



def is_seg_config(config: CN) -> bool:
    """Whether ``config`` describes a segmentation run (its DATA.DATASET is one of
    SEGMENTATION_DATASETS)."""
    return config.DATA.DATASET in SEGMENTATION_DATASETS


def require_classification_config(config: CN, path: str, tool_and_what: str) -> None:
    """Raises DataError for a segmentation config (``path``): the tool works on main.py's
    classification runs only, as ``tool_and_what`` says ("export.py exports ...")."""
    if is_seg_config(config):
        raise DataError(f"{path} is a segmentation config (DATA.DATASET "
                        f"{config.DATA.DATASET!r}, main_seg.py): {tool_and_what}")


def _image_folder(root: str, split: str, transform: Callable, config: CN) -> ImageFolderDataset:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} not found: DATA.DATA_PATH (--data-path) must hold train/ and "
                        f"val/, each with one sub-folder of images per class")
    return ImageFolderDataset(folder, transform, config.DATA.SKIP_BAD_IMAGES)


def build_dataset(is_train: bool, config: CN) -> tuple[Dataset, int]:
    """The train or val dataset of ``config.DATA.DATASET`` and its number of classes."""
    transform = build_transform(is_train, config)
    name = config.DATA.DATASET
    if name == "imagenet":
        root = config.DATA.DATA_PATH
        if not root:
            raise DataError("DATA.DATA_PATH (--data-path) is not set: give the folder that holds "
                            "train/ and val/")
        if not os.path.isdir(root):
            raise DataError(f"DATA.DATA_PATH (--data-path) {root} is not a folder")
        if not os.listdir(root):
            raise DataError(f"DATA.DATA_PATH (--data-path) {root} is empty: expected train/ and "
                            "val/")
        dataset = _image_folder(root, "train" if is_train else "val", transform, config)
        num_classes = len(dataset.classes)
    elif name == "digits":
        from .digits import NUM_CLASSES, build_digits_dataset
        dataset = build_digits_dataset(is_train, transform)
        num_classes = NUM_CLASSES
    elif name == "cub":
        from .cub import CUBDataset
        if not config.DATA.DATA_PATH:
            raise DataError("DATA.DATA_PATH (--data-path) is not set: give the CUB_200_2011 folder")
        dataset = CUBDataset(config.DATA.DATA_PATH, is_train, transform,
                             config.DATA.SKIP_BAD_IMAGES)
        num_classes = len(dataset.classes)
    else:
        hint = (" (a segmentation dataset: run main_seg.py)" if name in SEGMENTATION_DATASETS
                else "")
        raise DataError(f"DATA.DATASET {name!r} is unknown: expected 'imagenet', 'digits' or "
                        f"'cub'{hint}")
    if num_classes != config.MODEL.NUM_CLASSES:
        where = getattr(dataset, "root", f"the {name} dataset")
        raise DataError(f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES} but {where} has "
                        f"{num_classes} classes{_missing_classes(dataset, is_train)}")
    return dataset, num_classes


def posterize(img: Image.Image, bits: int, **_: Any) -> Image.Image:
    """Keeps the ``bits`` (0 to 8) most significant bits of every channel; 0 bits gives a black
    image, as Pillow did before version 13.

    timm's RandAugment asks for 0 bits at its top magnitude (``PosterizeIncreasing`` at
    magnitude 10, reached through ``mstd``), which Pillow 13 refuses with a ValueError; the
    recipe was trained with the older behaviour, which this keeps for every Pillow version.
    """
    if bits >= 8:
        return img
    mask = 0xFF & ~(2 ** (8 - max(bits, 0)) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _augment_ops(transform: Callable) -> Iterator[auto_augment.AugmentOp]:
    """The ``AugmentOp``s of timm's RandAugment, AutoAugment and AugMix inside ``transform``."""
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
            yield from t.ops
        elif isinstance(t, auto_augment.AutoAugment):
            yield from itertools.chain.from_iterable(t.policy)


def build_transform(is_train: bool, config: CN) -> Callable:
    """Training: timm's RandomResizedCrop (``AUG.SCALE``), flip (``AUG.HFLIP``), RandAugment (its
    posterize replaced by :func:`posterize`), colour jitter and random erasing (``AUG.*``).
    Evaluation: resize to IMG_SIZE * 256/224 and center-crop (``TEST.CROP``), or resize."""
    size = config.DATA.IMG_SIZE
    if is_train:
        auto_augment_policy = config.AUG.AUTO_AUGMENT
        transform = create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=(auto_augment_policy if auto_augment_policy not in ("", "none")
                          else None),
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
        for op in _augment_ops(transform):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
        return transform
    interpolation = str_to_interp_mode(
        "bicubic" if config.DATA.INTERPOLATION == "random" else config.DATA.INTERPOLATION)
    if config.TEST.CROP:
        resize = [transforms.Resize(int(size * 256 / 224), interpolation=interpolation),
                  transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    normalize = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return transforms.Compose(resize + [transforms.ToTensor(), normalize])


def _missing_classes(dataset: Dataset, is_train: bool) -> str:
    """For a message: the class folders that the other split (train/ or val/) has and
    ``dataset`` lacks, or ""."""
    root = getattr(dataset, "root", None)
    other = os.path.join(os.path.dirname(root or ""), "val" if is_train else "train")
    if not root or not os.path.isdir(other):
        return ""
    missing = sorted({e.name for e in os.scandir(other) if e.is_dir()} - set(dataset.classes))
    return f": missing {missing}, which {other} has" if missing else ""


def init_worker(training_pid: int, logs: Any, worker_id: int) -> None:
    """``worker_init_fn`` of the loaders (the training process's pid and :func:`_worker_logs`
    bound). A worker ignores the stop signals, which a launcher or Slurm sends to the whole
    process group (the training process decides when to stop and ends its workers itself; they
    start with the signals blocked, see :class:`Loader`); sends its "mg_ssaf" log records to the
    training process, which logs them as its own; and ends as soon as the training process has
    ended, however it ended. torch's own check, a change of the worker's parent, does not see
    that under the fork server: the parent is the server, which lives as long as any worker
    does."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    logs.cancel_join_thread()  # exiting does not wait for records nobody may read
    logger = logging.getLogger("mg_ssaf")
    for handler in list(logger.handlers):  # the training process's, where it was forked
        logger.removeHandler(handler)
    logger.addHandler(logging.handlers.QueueHandler(logs))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    threading.Thread(target=_exit_with, args=(training_pid,), name="exit-with-training",
                     daemon=True).start()


def _exit_with(pid: int) -> None:
    """Ends this process once process ``pid`` has ended (a pidfd where Linux has them, else a
    check every second)."""
    try:
        poller = select.poll()
        poller.register(os.pidfd_open(pid), select.POLLIN)  # readable once pid has ended
        poller.poll()
    except (AttributeError, OSError):  # no pidfd_open (macOS, Linux < 5.3), or pid already gone
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(0)


class _Relay(logging.Handler):
    """Hands each record to this process's logger of the record's name (console, log file)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


@functools.lru_cache(maxsize=None)
def _worker_logs() -> Any:
    """The queue that brings the log records of this process's loader workers to its loggers,
    with the (daemon) thread that empties it; at exit the thread gets up to a second to log what
    was sent. (It is not stopped through the queue: a worker killed while it wrote to the queue
    leaves the queue's write lock held.) Made at the first :meth:`Loader.__iter__` with workers,
    with the stop signals blocked: its semaphores start multiprocessing's resource tracker, which
    then keeps SIGUSR1 blocked (and ignores the others), but unblocks SIGINT and SIGTERM here as
    it starts: they are blocked again before the fork server starts."""
    logs = WORKER_CONTEXT.Queue()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    logging.handlers.QueueListener(logs, _Relay()).start()
    atexit.register(_drain, logs)
    return logs


def _drain(logs: Any, timeout: float = 1.0) -> None:
    """Waits up to ``timeout`` seconds for the queue ``logs`` to be empty."""
    deadline = time.monotonic() + timeout
    while not logs.empty() and time.monotonic() < deadline:
        time.sleep(0.01)


class Loader(DataLoader):
    """A DataLoader whose worker processes start from :data:`~data.common.WORKER_CONTEXT` (a fork
    server, not a fork of this multi-threaded process) and survive a stop signal sent to the
    process group: the workers start (in ``iter``) with the stop signals blocked and ignore them
    from their ``worker_init_fn`` (:func:`init_worker`) on, so no signal reaches them in between.
    (The fork server is started by the first such ``iter``, so it too keeps them blocked, and
    passes the mask on to every worker it forks.) The main process receives a signal that arrives
    meanwhile as soon as the workers have started. Workers end with the main process, however it
    ends (a kill -9 included).

    Since the workers ignore SIGTERM, which is how torch's iterator shutdown and
    multiprocessing's exit handler end workers that do not stop by themselves (followed by a join
    without timeout), the main process ends them itself: when a batch cannot be produced (an
    exception from a worker, e.g. an unreadable image), the iterator's workers are killed before
    the exception goes on (the loader is not iterated again: the run ends), and any still running
    at exit are killed then (see :func:`stop_loader_workers`)."""

    def __init__(self, dataset: Dataset, persistent: bool = False, **kwargs: Any) -> None:
        """``persistent``: the workers live from one ``iter`` to the next (a training loader's
        start once per run, not at every epoch, each with the dataset pickled). Other arguments
        as DataLoader's."""
        if kwargs.get("num_workers", 0) > 0:
            kwargs.update(multiprocessing_context=WORKER_CONTEXT, persistent_workers=persistent)
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Iterator:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.num_workers > 0:
                self.worker_init_fn = functools.partial(init_worker, os.getpid(), _worker_logs())
            iterator = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if not getattr(iterator, "_workers", None):
            return iterator  # no worker processes (DATA.NUM_WORKERS 0)
        _worker_iterators.add(iterator)
        return _StopWorkersOnError(iterator)


class _StopWorkersOnError:
    """Iterates ``iterator`` (a multi-process loader's); an exception while fetching a batch
    kills its workers before it propagates (the exception's traceback would keep the iterator,
    and so its workers, alive until exit)."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator = iterator

    def __iter__(self) -> Iterator:
        return self

    def __len__(self) -> int:
        return len(self.iterator)

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            raise
        except BaseException:
            _stop_workers(self.iterator)
            raise

    def shutdown(self) -> None:
        """Kills the workers now (after a failure elsewhere: the run ends)."""
        _stop_workers(self.iterator)


# Iterators of Loaders whose worker processes may still run.
_worker_iterators: weakref.WeakSet = weakref.WeakSet()


def _stop_workers(iterator: Any) -> None:
    """Kills the worker processes of a DataLoader iterator and closes its queues, without
    waiting for the workers to finish what they are doing. Their pids are first taken out of
    torch's SIGCHLD check, which would otherwise report the killed workers as a failure."""
    _worker_iterators.discard(iterator)
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling
        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    workers = getattr(iterator, "_workers", [])
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join()
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # queues and the pin-memory thread; the workers are gone


def stop_loader_workers() -> None:
    """Kills the worker processes of every Loader iterator still running (at the exit of the
    process, where multiprocessing would SIGTERM them, which they ignore, and wait forever)."""
    for iterator in list(_worker_iterators):
        _stop_workers(iterator)


atexit.register(stop_loader_workers)  # runs before torch's and multiprocessing's exit handlers


def build_mixup(config: CN) -> Mixup | None:
    """timm's Mixup/CutMix from ``AUG.*`` (label smoothing included), or None when both are off."""
    if not mixup_enabled(config):
        return None
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX,
                 cutmix_minmax=config.AUG.CUTMIX_MINMAX, prob=config.AUG.MIXUP_PROB,
                 switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def build_loader(config: CN) -> tuple[Dataset | None, Dataset, DataLoader | None, DataLoader,
                                      Mixup | None]:
    """``dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn``.

    The training parts are None in ``EVAL_MODE`` and ``THROUGHPUT_MODE`` (only val/ is needed).
    Training batches are shuffled per epoch and split over ranks; validation is split so that
    every image is evaluated exactly once across ranks."""
    rank, world_size = get_rank(), get_world_size()
    pin_memory = config.DATA.PIN_MEMORY and torch.cuda.is_available()
    dataset_val, _ = build_dataset(is_train=False, config=config)
    data_loader_val = Loader(
        dataset_val, sampler=ShardSampler(dataset_val, world_size, rank),
        batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
        pin_memory=pin_memory, drop_last=False)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return None, dataset_val, None, data_loader_val, None

    dataset_train, _ = build_dataset(is_train=True, config=config)
    train_classes, val_classes = (set(getattr(d, "classes", ()))
                                  for d in (dataset_train, dataset_val))
    if train_classes != val_classes:
        raise DataError(f"train/ and val/ of {config.DATA.DATA_PATH} have different class "
                        f"folders: only in train/: {sorted(train_classes - val_classes)}, only in "
                        f"val/: {sorted(val_classes - train_classes)}")
    sampler = ResumableSampler.one_pass(dataset_train, world_size, rank, config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DataError(f"the training set ({len(dataset_train)} images) gives each of the "
                        f"{world_size} rank(s) {len(sampler)} images, less than one batch of "
                        f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE}")
    data_loader_train = Loader(
        SeededSamples(dataset_train, config.SEED), persistent=True, sampler=sampler,
        batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
        pin_memory=pin_memory, drop_last=True)
    return dataset_train, dataset_val, data_loader_train, data_loader_val, build_mixup(config)
