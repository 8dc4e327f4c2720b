"""ImageFolder trees for the image problems: checks, transforms, loaders, top-k counts.

A tree is ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>`` with the same
class folders in both (ImageNet: ``imagenet1k/{train,val}/<wnid>/*.JPEG``; Fashion-MNIST:
``python -m experiments.data fashion-mnist``). :func:`check_image_folder` says what is
wrong with a tree and how to arrange it before anything is loaded.

Reproducibility (docs/images.md): the training order of epoch ``e`` is a permutation seeded
by (seed, e) alone, and the random augmentation of sample ``i`` in epoch ``e`` draws from
torch's generator seeded by (seed, e, i) inside ``__getitem__``. Neither depends on the
number of workers, on which worker loads a sample, on how many batches were skipped, or on
the global torch generator (which the loaders neither read nor advance), so a run resumed
at batch ``k`` of an epoch sees exactly the batches an uninterrupted run sees from ``k`` on.
The global batch of step ``b`` is positions ``[b*G, (b+1)*G)`` of the permutation
(G = local_batch x world_size), rank ``r`` taking its ``r``-th chunk: at equal global batch
the samples and their augmentation are the same for any world size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from experiments.errors import ConfigError, DatasetError, RunError, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val")

_VALPREP_HINT = (
    "sort them into val/<wnid>/ folders named as in train/ (ImageNet's val images come flat: "
    "move each to its wnid with the devkit's ILSVRC2012_validation_ground_truth.txt mapped "
    "through meta.mat, or with the widely used valprep.sh script, both outside this suite)"
)


# --- checking a tree ----------------------------------------------------------------------

def is_image_name(name: str) -> bool:
    """An image file as torchvision's ImageFolder counts them, without hidden files (e.g.
    macOS's ``._x.JPEG`` resource forks, which are not images)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted non-hidden sub-folders of ``split_dir``: the classes, as the loaders see them."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` (or a sub-folder, as ImageFolder walks them) holds an image; stops
    at the first, so checking ImageNet's 2,000 class folders reads a few entries of each."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif is_image_name(entry.name):
                return True
    return any(_has_image(Path(sub)) for sub in subfolders)


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_image_folder(root: Path | str, *, dataset: str, how_to: str) -> list[str]:
    """The sorted class names of the tree at ``root``; DatasetError (one line: what is wrong,
    how to arrange the files, then ``how_to``) for a missing root or split, images lying
    directly in a split folder (a flat val), a split without class folders, class sets
    that differ between train and val, or a class folder without images."""
    root = Path(root)
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> with the same class folders"

    def error(what: str) -> DatasetError:
        return DatasetError(f"{dataset}: {what}; {how_to}")

    if not root.is_dir():
        raise error(f"{root} does not exist ({layout})")
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise error(f"{split_dir} is missing ({layout})")
        loose = [e.name for e in os.scandir(split_dir) if e.is_file() and is_image_name(e.name)]
        if loose:
            hint = _VALPREP_HINT if split == "val" else f"sort them into {split}/<class>/ folders"
            raise error(f"{split_dir} holds {len(loose)} image(s) directly (e.g. {sorted(loose)[0]}) instead of one folder per class: {hint}")
        classes[split] = class_folders(split_dir)
        if not classes[split]:
            raise error(f"{split_dir} has no class folders ({layout})")
    only_train = sorted(set(classes["train"]) - set(classes["val"]))
    only_val = sorted(set(classes["val"]) - set(classes["train"]))
    if only_train or only_val:
        parts = [f"{len(classes['train'])} classes in train/ and {len(classes['val'])} in val/"]
        if only_train:
            parts.append(f"only in train/: {_few(only_train)}")
        if only_val:
            parts.append(f"only in val/: {_few(only_val)}")
        raise error(f"{root}: the class folders of train/ and val/ differ ({'; '.join(parts)}); both splits need the same class folders")
    for split in SPLITS:
        empty = [name for name in classes[split] if not _has_image(root / split / name)]
        if empty:
            raise error(
                f"{len(empty)} class folder(s) of {root / split} hold no images (e.g. {root / split / empty[0]}; "
                f"images end in {', '.join(IMG_EXTENSIONS)}); every class needs images in both splits"
            )
    return classes["train"]


# --- reading images -----------------------------------------------------------------------

class UnreadableImage(DatasetError):
    """An image file PIL cannot decode; the message names the file."""


def load_rgb(path: str) -> Any:
    """The image at ``path`` as an RGB PIL image (grey, CMYK and palette images converted,
    as torchvision's default loader does: every image has 3 channels)."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{path}: cannot be read as an image ({type(error).__name__}: {error}); replace or delete the file") from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of sample ``index``'s augmentation in ``epoch`` (64 bits, well mixed)."""
    sequence = np.random.SeedSequence(seed, spawn_key=(1, epoch, index))
    return int(sequence.generate_state(1, np.uint64)[0])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``: a permutation of range(n) seeded by (seed, epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, epoch)))
    return rng.permutation(n)


def _valid_image_path(path: str) -> bool:
    return is_image_name(os.path.basename(path))


class SeededImageFolder(ImageFolder):
    """ImageFolder whose keys are ``(epoch, index)`` (or ``index``: epoch 0), whose transform
    draws from torch's generator seeded by ``sample_seed(seed, epoch, index)`` (the global
    generator is restored afterwards), whose classes skip hidden folders, and whose loader
    raises :class:`UnreadableImage` naming the file. Transforms must draw their randomness
    from torch (all torchvision transforms do), not from ``random`` or numpy."""

    def __init__(self, root: Path | str, *, transform: Callable | None, seed: int):
        self.seed = seed
        super().__init__(str(root), transform=transform, loader=load_rgb, is_valid_file=_valid_image_path)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                image = self.transform(image)
        return image, target


def verify_images(root: Path | str, *, dataset: str, how_to: str) -> int:
    """Check the tree's layout, then decode every image once; the number of images, or
    DatasetError naming the unreadable files (cheap for the small trees, hours for ImageNet)."""
    from PIL import Image

    root = Path(root)
    check_image_folder(root, dataset=dataset, how_to=how_to)
    count, bad = 0, []
    for split in SPLITS:
        for path, _ in SeededImageFolder(root / split, transform=None, seed=0).samples:
            count += 1
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                bad.append(path)
    if bad:
        raise DatasetError(f"{dataset}: {len(bad)} of {count} images cannot be read: {_few(bad)}; replace or delete them")
    return count


# --- transforms ---------------------------------------------------------------------------

def imagenet_train_transform(size: int = 224) -> Callable:
    """ImageNet training augmentation: RandomResizedCrop(size), horizontal flip, normalise."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_val_transform(size: int = 224, resize: int = 256) -> Callable:
    """ImageNet evaluation: Resize(resize) of the short side, CenterCrop(size), normalise."""
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def small_train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Small-image augmentation (CIFAR style): RandomCrop(size, padding=size // 8) of a
    ``size`` x ``size`` image, horizontal flip, normalise. Three channels: the loader gives
    RGB (a grey image as three equal channels), as in the ImageNet pipeline."""
    return T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def small_val_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Small-image evaluation: CenterCrop(size) (a no-op on a ``size`` image), normalise."""
    return T.Compose([T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


# --- loaders ------------------------------------------------------------------------------

class _TrainBatches:
    """Batch sampler of this rank's training batches of one epoch, from batch ``skip`` on;
    ``ImageLoaders`` sets ``epoch`` and ``skip`` before each pass (it runs in the main
    process, so persistent workers need not know)."""

    def __init__(self, n: int, local_batch: int, rank: int, world_size: int, seed: int, drop_last: bool):
        self.n, self.local_batch, self.rank, self.world_size = n, local_batch, rank, world_size
        self.seed, self.drop_last = seed, drop_last
        self.global_batch = local_batch * world_size
        self.epoch, self.skip = 1, 0
        self._permutation: tuple[int, np.ndarray] | None = None

    def steps(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self._permutation[1]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """Dataset indices of this rank's batch ``step`` (0-based) of ``epoch``."""
        start = step * self.global_batch
        block = self.permutation(epoch)[start : start + self.global_batch]
        if len(block) == self.global_batch:
            return block[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return np.array_split(block, self.world_size)[self.rank]  # last, partial (drop_last off)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.skip, self.steps()):
            yield [(self.epoch, int(i)) for i in self.indices(self.epoch, step)]

    def __len__(self) -> int:
        return self.steps() - self.skip


class _ValBatches:
    """This rank's contiguous shard of the val set, in batches; shards of the ranks are
    disjoint and their union is the whole set (sizes differ by at most one)."""

    def __init__(self, n: int, batch: int, rank: int, world_size: int):
        shard = np.array_split(np.arange(n), world_size)[rank]
        self.batches = [[int(i) for i in shard[s : s + batch]] for s in range(0, len(shard), batch)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageLoaders:
    """Training and validation batches of one rank over the tree at ``root``.

    ``train_batches(epoch, skip)`` yields this rank's local batches of ``epoch`` (1-based)
    from batch ``skip`` on (skipped batches are never loaded); ``val_batches()`` this rank's
    shard of the whole val set. Batches are ``(images, labels)`` on ``device`` (copied
    with non_blocking; pinned memory by default on CUDA). Each loader keeps its ``workers``
    processes between passes (``persistent_workers``); iterate one pass of a loader at a time.
    ``dataset``/``how_to`` name the tree in errors; ``verify`` decodes every image first.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        train_transform: Callable,
        val_transform: Callable,
        local_batch: int,
        workers: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        val_batch: int | None = None,
        dataset: str = "image folder",
        how_to: str = "see docs/images.md",
        verify: bool = False,
    ):
        require(isinstance(local_batch, int) and local_batch >= 1, "local_batch", "must be an integer >= 1", local_batch)
        require(isinstance(workers, int) and workers >= 0, "workers", "must be an integer >= 0", workers)
        require(isinstance(seed, int) and seed >= 0, "seed", "must be an integer >= 0", seed)
        require(isinstance(world_size, int) and world_size >= 1, "world_size", "must be an integer >= 1", world_size)
        require(isinstance(rank, int) and 0 <= rank < world_size, "rank", f"must be in [0, {world_size - 1}]", rank)
        root = Path(root)
        self.root, self.dataset, self.how_to = root, dataset, how_to
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.local_batch, self.device = local_batch, torch.device(device)
        self.classes = check_image_folder(root, dataset=dataset, how_to=how_to)
        if verify:
            verify_images(root, dataset=dataset, how_to=how_to)
        self.train_set = SeededImageFolder(root / "train", transform=train_transform, seed=seed)
        self.val_set = SeededImageFolder(root / "val", transform=val_transform, seed=seed)
        self.num_classes = len(self.classes)
        global_batch = local_batch * world_size
        if drop_last and len(self.train_set) < global_batch:
            raise ConfigError(
                "local_batch",
                f"the global batch {local_batch} x {world_size} ranks = {global_batch} exceeds the "
                f"{len(self.train_set)} training images of {root / 'train'}: no full batch per epoch",
            )
        if not drop_last and 0 < len(self.train_set) % global_batch < world_size:
            raise ConfigError(
                "drop_last",
                f"off, the last batch holds {len(self.train_set) % global_batch} image(s) for {world_size} ranks: "
                "some rank would get none; turn drop_last on or change the batch size",
            )
        self._train_sampler = _TrainBatches(len(self.train_set), local_batch, rank, world_size, seed, drop_last)
        val_sampler = _ValBatches(len(self.val_set), val_batch or local_batch, rank, world_size)
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        persistent = persistent_workers and workers > 0

        def loader(data: SeededImageFolder, sampler: Any, offset: int) -> torch.utils.data.DataLoader:
            # A private generator: creating an iterator draws a base seed from it, which
            # would otherwise advance the global torch generator at each pass.
            generator = torch.Generator().manual_seed(seed * 2 + offset)
            return torch.utils.data.DataLoader(
                data, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                persistent_workers=persistent, generator=generator,
            )

        self._train_loader = loader(self.train_set, self._train_sampler, 0)
        self._val_loader = loader(self.val_set, val_sampler, 1)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of each rank (with drop_last: full global batches only)."""
        return self._train_sampler.steps()

    @property
    def train_samples(self) -> int:
        return len(self.train_set)

    @property
    def val_samples(self) -> int:
        return len(self.val_set)

    def train_indices(self, epoch: int, step: int) -> list[int]:
        """Dataset indices of this rank's batch ``step`` (0-based) of ``epoch``."""
        return [int(i) for i in self._train_sampler.indices(epoch, step)]

    def train_batches(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        require(isinstance(epoch, int) and epoch >= 1, "epoch", "must be an integer >= 1 (epochs count from 1)", epoch)
        require(isinstance(skip, int) and 0 <= skip <= self.steps_per_epoch, "skip", f"must be in [0, {self.steps_per_epoch}]", skip)
        self._train_sampler.epoch, self._train_sampler.skip = epoch, skip
        return self._moved(self._train_loader)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._moved(self._val_loader)

    def _moved(self, loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except DatasetError as error:
            raise type(error)(_worker_message(error)) from None

    def state_dict(self) -> dict[str, int]:
        """What the data order depends on besides the epoch and the batch index."""
        return {"seed": self.seed, "train_samples": self.train_samples, "local_batch": self.local_batch, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Check that a checkpoint's data order is this one (nothing to restore otherwise)."""
        mine = self.state_dict()
        differ = {key: (state.get(key), value) for key, value in mine.items() if state.get(key) != value}
        if differ:
            detail = ", ".join(f"{key} {saved} in the checkpoint, {now} now" for key, (saved, now) in differ.items())
            raise RunError(f"{self.root}: the checkpoint's data order differs from this run's ({detail}); resume with the same data and settings, or start a new run")


def _worker_message(error: Exception) -> str:
    """The original message of an error re-raised from a DataLoader worker, which wraps it
    in "Caught X in DataLoader worker process N. Original Traceback ...": the traceback's
    last line is "<module>.<type>: <message>"."""
    message = str(error)
    if not message.startswith("Caught "):
        return message
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    last = message.rstrip().splitlines()[-1]
    return last[len(prefix):] if last.startswith(prefix) else message


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows of ``logits`` (batch x classes) rank their label among the top k, for
    each k of ``ks`` (keys as given). A k above the number of classes counts as the number
    of classes (every row correct), so top-5 is defined on a 3-class toy problem."""
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"topk_correct: ks must be integers >= 1, got {ks!r}")
    classes = logits.shape[1]
    top = logits.topk(min(max(ks), classes), dim=1).indices
    hits = top.eq(labels.reshape(-1, 1))
    return {k: int(hits[:, : min(k, classes)].any(dim=1).sum().item()) for k in ks}
