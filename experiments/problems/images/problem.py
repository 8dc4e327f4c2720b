"""Image classification: ResNet-50 on ImageNet-1k (the paper's Fig. 4) and a ResNet-18 for
small images on Fashion-MNIST (the CPU-scale large-batch study), one pipeline for both.

Data: an ImageFolder tree under ``<data root>/<problem.dataset>/{train,val}/<class>/``
(experiments.problems.images.data checks it and loads it). Each rank trains on its own
local batch of ``problem.local_batch`` images, so the global batch is local_batch x the
world size; the order and augmentation of every epoch are functions of (seed, epoch) only,
which makes a run resumable inside an epoch (batches are skipped by index, not loaded).

Loss: cross-entropy over the classes, optionally label-smoothed. The paper writes "binary
cross-entropy", which does not describe 1,000-way classification (docs/images.md).
Evaluation: loss (no smoothing), top-1 and top-5 accuracy over the whole val set, each
rank evaluating its shard and the sums all-reduced.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

import torch

from experiments.errors import ConfigError, require
from experiments.ranges import check_reals
from experiments.problems.base import Problem

Batch = tuple[torch.Tensor, torch.Tensor]

IMAGENET_HOW_TO = (
    "ImageNet-1k cannot be downloaded by this suite: place ILSVRC2012's training images as "
    "<data root>/imagenet1k/train/<wnid>/*.JPEG and its validation images sorted the same way "
    "as <data root>/imagenet1k/val/<wnid>/*.JPEG (docs/images.md)"
)


def _check_common(cfg: Any) -> None:
    require(cfg.local_batch >= 1, "problem.local_batch", "must be an integer >= 1", cfg.local_batch)
    require(cfg.workers >= 0, "problem.workers", "must be an integer >= 0 (0: load in the training process)", cfg.workers)
    check_reals(cfg, "problem.")  # label_smoothing: experiments.ranges
    require(
        cfg.eval_every_steps is None,
        "problem.eval_every_steps",
        "is not supported yet (rows are written per epoch, every train.eval_every); leave it null",
        cfg.eval_every_steps,
    )
    require(
        cfg.val_batch is None or cfg.val_batch >= 1, "problem.val_batch", "must be null or an integer >= 1", cfg.val_batch
    )
    require(
        bool(cfg.dataset) and "/" not in cfg.dataset and cfg.dataset not in (".", ".."),
        "problem.dataset",
        "must be the name of a directory under the data root",
        cfg.dataset,
    )


@dataclass
class ImageNetConfig:
    local_batch: int = 64  # images per rank per step; global batch = local_batch x ranks
    workers: int = 8  # DataLoader worker processes per rank
    pin_memory: Optional[bool] = None  # null: on for CUDA
    label_smoothing: float = 0.0
    channels_last: bool = False
    # Evaluate every N steps as well as every epoch (read by the training loop; null: epochs only).
    eval_every_steps: Optional[int] = None
    val_batch: Optional[int] = None  # null: local_batch
    dataset: str = "imagenet1k"  # directory under the data root
    crop_size: int = 224  # RandomResizedCrop (training) and CenterCrop (val) side
    resize_size: int = 256  # val: the short side is resized to this before the centre crop

    def __post_init__(self) -> None:
        _check_common(self)
        require(self.crop_size >= 8, "problem.crop_size", "must be an integer >= 8 (pixels)", self.crop_size)
        require(
            self.resize_size >= self.crop_size,
            "problem.resize_size",
            f"must be an integer >= problem.crop_size ({self.crop_size})",
            self.resize_size,
        )


@dataclass
class FashionConfig:
    local_batch: int = 128
    workers: int = 0  # the images are tiny: decoding them in the training process is cheapest
    pin_memory: Optional[bool] = None
    label_smoothing: float = 0.0
    channels_last: bool = False
    eval_every_steps: Optional[int] = None
    val_batch: Optional[int] = 500
    dataset: str = "fashion_mnist"  # built by python -m experiments.data fashion-mnist
    size: int = 28  # side of the images the tree was built with (--size)
    width: int = 64  # channels of the first stage (ResNet-18: 64)

    def __post_init__(self) -> None:
        _check_common(self)
        require(self.size >= 8, "problem.size", "must be an integer >= 8 (pixels, the tree's --size)", self.size)
        require(self.width >= 1, "problem.width", "must be an integer >= 1", self.width)


def distributed_place() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's where it is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def tree_checksum(root: Path, *, contents: bool) -> str:
    """SHA-256 of the sorted listing of ``root`` (relative path and size of every file, hidden
    files and folders skipped), with each file's bytes where ``contents``. The listing alone
    notices added, removed, renamed and resized images at the cost of one stat per file,
    which is what ImageNet's 1.3 million files afford at every validation."""
    digest = hashlib.sha256()
    for directory, folders, files in os.walk(root, followlinks=True):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            digest.update(f"{relative}\0{path.stat().st_size}\n".encode())
            if contents:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class ImageClassification(Problem):
    """One image-classification problem: subclasses choose the tree, transforms and model."""

    budget_unit = "epoch"
    ddp = True
    #: Whether the data's identity hashes every file's bytes (small trees) or only the
    #: listing of paths and sizes (ImageNet).
    hash_contents: ClassVar[bool] = True
    how_to: ClassVar[str] = "see docs/images.md"

    # --- what a subclass provides -----------------------------------------------------
    def transforms(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def make_model(self, num_classes: int) -> torch.nn.Module:
        raise NotImplementedError

    # --- data -------------------------------------------------------------------------
    @classmethod
    def tree(cls, cfg: Any, data_root: Path) -> Path:
        return Path(data_root) / cfg.dataset

    @classmethod
    def input_identity(cls, cfg: Any, data_root: Path) -> dict[str, str]:
        from experiments.problems.images.data import check_image_folder

        root = cls.tree(cfg, data_root)
        check_image_folder(root, dataset=cfg.dataset, how_to=cls.how_to)
        # data.<name>.sha256 either way (what analysis matches runs' data on); which of the
        # two checksums it is follows from the problem (docs/images.md).
        return {f"data.{cfg.dataset}.sha256": tree_checksum(root, contents=cls.hash_contents)}

    def __init__(self, cfg: Any, *, data_root: Path, seed: int, device: torch.device):
        from experiments.problems.images.data import ImageLoaders

        super().__init__(cfg, data_root=data_root, seed=seed, device=device)
        self.rank, self.world_size = distributed_place()
        train_transform, val_transform = self.transforms()
        try:
            self.loaders = ImageLoaders(
                self.tree(cfg, data_root), train_transform=train_transform, val_transform=val_transform,
                local_batch=cfg.local_batch, workers=cfg.workers, seed=seed, rank=self.rank,
                world_size=self.world_size, device=device, pin_memory=cfg.pin_memory,
                val_batch=cfg.val_batch, dataset=cfg.dataset, how_to=self.how_to,
            )
        except ConfigError as error:  # e.g. a global batch larger than the training set
            raise ConfigError(f"problem.{error.key}", error.detail) from None

    @property
    def samples_per_step(self) -> int:
        """Images per optimizer step over all ranks: the global batch."""
        return self.cfg.local_batch * self.world_size

    @property
    def eval_every_steps(self) -> Optional[int]:
        return self.cfg.eval_every_steps

    def batches(self, unit: int) -> Iterator[Batch]:
        return self.loaders.train_batches(unit)

    def batches_from(self, unit: int, skip: int) -> Iterator[Batch]:
        return self.loaders.train_batches(unit, skip=skip)

    def local_batch(self, batch: Batch, rank: int, world_size: int) -> Batch:
        return batch  # the loaders already give this rank its part of the global batch

    def state_dict(self) -> dict[str, Any]:
        return self.loaders.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.loaders.load_state_dict(state)

    # --- model, loss, evaluation ------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        return self.make_model(self.loaders.num_classes).to(self.device)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch
        logits = model(self._input(images))
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        from experiments.problems.images.data import topk_correct

        if self.world_size > 1:
            import torch.distributed as dist

            # DDP gives every forward rank 0's buffers, but each rank's last training forward
            # then moved its own BatchNorm statistics: evaluate rank 0's model everywhere,
            # the one the run saves.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        # loss sum, top-1 hits, top-5 hits, images: sums over this rank's shard, then all ranks.
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        for images, labels in self.loaders.val_batches():
            logits = model(self._input(images)).float()
            hits = topk_correct(logits, labels, ks=(1, 5))
            totals[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            totals += torch.tensor([0.0, hits[1], hits[5], len(labels)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, top1, top5, count = totals.tolist()
        return {"val_loss": loss_sum / count, "val_top1": top1 / count, "val_top5": top5 / count}

    def notes(self) -> list[str]:
        loaders = self.loaders
        return [
            f"{self.cfg.dataset}: {loaders.train_samples} training / {loaders.val_samples} validation images in "
            f"{loaders.num_classes} classes ({self.tree(self.cfg, self.data_root)})",
            f"global batch {self.samples_per_step} = {self.cfg.local_batch} per rank x {self.world_size} rank(s), "
            f"{loaders.steps_per_epoch} steps per epoch (last partial batch dropped)",
            "loss: cross-entropy" + (f" with label smoothing {self.cfg.label_smoothing}" if self.cfg.label_smoothing else "")
            + " (the paper's 'binary cross-entropy' does not fit multi-class classification; docs/images.md)",
        ]


class ImageNetResNet50(ImageClassification):
    """ResNet-50 on ImageNet-1k, the paper's Fig. 4."""

    name = "imagenet_resnet50"
    Config = ImageNetConfig
    hash_contents = False
    how_to = IMAGENET_HOW_TO

    def transforms(self) -> tuple[Any, Any]:
        from experiments.problems.images.data import imagenet_train_transform, imagenet_val_transform

        cfg = self.cfg
        return imagenet_train_transform(cfg.crop_size), imagenet_val_transform(cfg.crop_size, cfg.resize_size)

    def make_model(self, num_classes: int) -> torch.nn.Module:
        from experiments.problems.images.models import resnet50

        return resnet50(num_classes, channels_last=self.cfg.channels_last)


class FashionResNet(ImageClassification):
    """A ResNet-18 for small images on Fashion-MNIST: the CPU-scale large-batch study."""

    name = "fashion_resnet"
    Config = FashionConfig

    how_to = (
        "build it with python -m experiments.data fashion-mnist --root <data root> "
        "[--train-per-class N --val-per-class N --size S] (docs/images.md)"
    )

    @classmethod
    def input_identity(cls, cfg: FashionConfig, data_root: Path) -> dict[str, str]:
        from experiments.problems.images.fashion_mnist import read_manifest

        identity = super().input_identity(cfg, data_root)
        manifest = read_manifest(cls.tree(cfg, data_root))
        built = manifest["arguments"]["size"] if manifest else None
        # Random crops of another size would silently train on other images than the tree's.
        require(
            built is None or built == cfg.size,
            "problem.size",
            f"must be the side the tree {cls.tree(cfg, data_root)} was built with ({built})",
            cfg.size,
        )
        return identity

    def transforms(self) -> tuple[Any, Any]:
        from experiments.problems.images.data import small_train_transform, small_val_transform
        from experiments.problems.images.fashion_mnist import MEAN, STD

        size = self.cfg.size
        return small_train_transform(size, MEAN, STD), small_val_transform(size, MEAN, STD)

    def make_model(self, num_classes: int) -> torch.nn.Module:
        from experiments.problems.images.models import small_resnet18

        return small_resnet18(num_classes, width=self.cfg.width, channels_last=self.cfg.channels_last)
