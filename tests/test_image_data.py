"""The image data layer: Fashion-MNIST IDX parsing and tree building, ImageFolder checks
with their messages, and loaders whose batches are a function of (seed, epoch, index)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from experiments import data as data_command
from experiments.errors import ConfigError, DatasetError, RunError
from experiments.problems.images import fashion_mnist as fm
from experiments.problems.images.data import (
    ImageLoaders,
    check_image_folder,
    imagenet_train_transform,
    imagenet_val_transform,
    small_train_transform,
    small_val_transform,
    topk_correct,
    verify_images,
)

INSTALL = "apt-get install dataset-fashion-mnist"


# --- IDX files ----------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    payload = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def synthetic_source(folder: Path, *, train_per_class: int = 6, val_per_class: int = 3, side: int = 8) -> Path:
    """IDX files as the release lays them out, with few small images in a shuffled class order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 256, size=(len(labels), side, side), dtype=np.uint8)
        images_name, labels_name = fm.FILES[split]
        write_idx(folder / images_name, images)
        write_idx(folder / labels_name, labels, gz=False)  # both spellings are read
    return folder


def test_read_idx_reads_gzipped_and_plain_files(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        path = write_idx(tmp_path / f"a{gz}", array, gz=gz)
        np.testing.assert_array_equal(fm.read_idx(path, ndim=3), array)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        pytest.param(b"\x01\x00\x08\x01" + np.asarray([3], ">i4").tobytes() + b"abc", "not an IDX file", id="magic"),
        pytest.param(b"\x00\x00\x0d\x01" + np.asarray([3], ">i4").tobytes() + b"abc", "type code 0x0d", id="type code"),
        pytest.param(b"\x00\x00\x08\x02" + np.asarray([3, 1], ">i4").tobytes() + b"abc", "2 dimension(s)", id="dimensions"),
        pytest.param(b"\x00\x00\x08\x01\x00\x00", "header is truncated", id="short header"),
        pytest.param(b"\x00\x00\x08\x01" + np.asarray([4], ">i4").tobytes() + b"abc", "needs 12", id="truncated"),
        pytest.param(b"\x00\x00\x08\x01" + np.asarray([2], ">i4").tobytes() + b"abc", "needs 10", id="trailing bytes"),
        pytest.param(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 40)[:-6], "cannot be read", id="damaged gzip"),
        pytest.param(b"", "magic number empty", id="empty"),
    ],
)
def test_read_idx_refuses_a_bad_file_naming_it_and_the_package(tmp_path, payload, fragment):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DatasetError) as caught:
        fm.read_idx(path, ndim=1)
    message = str(caught.value)
    assert str(path) in message and fragment in message and INSTALL in message


def test_missing_source_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError) as caught:
        fm.build_tree(tmp_path / "out", source=tmp_path / "nowhere")
    assert "does not exist" in str(caught.value) and INSTALL in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_labels_that_do_not_match_the_images_are_refused(tmp_path):
    source = synthetic_source(tmp_path / "src")
    write_idx(source / fm.FILES["val"][1], np.zeros(7, np.uint8), gz=False)  # 7 labels, 30 images
    with pytest.raises(DatasetError, match="7 labels for the 30 images"):
        fm.read_split(source, "val")


def test_the_installed_package(tmp_path):
    if not (fm.DEFAULT_SOURCE / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):  # .ci/system-packages installs it: missing there is a failure
            pytest.fail(f"missing {fm.DEFAULT_SOURCE}: {INSTALL}")
        pytest.skip(f"needs {fm.DEFAULT_SOURCE} ({INSTALL})")
    train, val = fm.read_split(fm.DEFAULT_SOURCE, "train"), fm.read_split(fm.DEFAULT_SOURCE, "val")
    assert train.images.shape == (60000, 28, 28) and val.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(val.labels).tolist() == [1000] * 10
    counts, values = np.bincount(train.images.ravel(), minlength=256), np.arange(256) / 255.0
    mean = counts @ values / counts.sum()
    std = np.sqrt(counts @ (values - mean) ** 2 / counts.sum())
    assert abs(mean - fm.MEAN[0]) < 1e-4 and abs(std - fm.STD[0]) < 1e-4
    tree = fm.build_tree(tmp_path / "fm", train_per_class=2, val_per_class=1, size=32)
    first = sorted((tree.root / "val" / fm.CLASSES[3]).iterdir())[0]
    assert Image.open(first).size == (32, 32) and val.labels[int(first.stem)] == 3


# --- the tree builder ---------------------------------------------------------------------

def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_tree_layout_holds_the_source_images_of_each_split(tmp_path):
    source = synthetic_source(tmp_path / "src")
    tree = fm.build_tree(tmp_path / "fm", source=source, train_per_class=4, val_per_class=2)
    assert sorted(os.listdir(tree.root / "train")) == list(fm.CLASSES) == sorted(fm.CLASSES)
    for split, per_class in (("train", 4), ("val", 2)):
        data = fm.read_split(source, split)
        for label, name in enumerate(fm.CLASSES):
            files = sorted((tree.root / split / name).iterdir())
            assert len(files) == per_class == tree.manifest["counts"][split][name]
            for path in files:  # the file is the source's image number <stem>, of that class
                index = int(path.stem)
                assert data.labels[index] == label
                np.testing.assert_array_equal(np.asarray(Image.open(path)), data.images[index])


def test_tree_is_deterministic_and_smaller_subsets_are_nested(tmp_path):
    source = synthetic_source(tmp_path / "src")
    a = fm.build_tree(tmp_path / "a", source=source, train_per_class=3, val_per_class=2, size=12, seed=5)
    b = fm.build_tree(tmp_path / "b", source=source, train_per_class=3, val_per_class=2, size=12, seed=5)
    assert tree_files(a.root) == tree_files(b.root) and a.manifest["tree_sha256"] == b.manifest["tree_sha256"]
    other = fm.build_tree(tmp_path / "c", source=source, train_per_class=3, val_per_class=2, size=12, seed=6)
    assert set(tree_files(other.root)) != set(tree_files(a.root))
    small = fm.build_tree(tmp_path / "d", source=source, train_per_class=1, val_per_class=1, size=12, seed=5)
    assert set(tree_files(small.root)) < set(tree_files(a.root))
    assert Image.open(next((a.root / "train").rglob("*.png"))).size == (12, 12)


def test_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    source = synthetic_source(tmp_path / "src")
    real, calls = fm.encode_png, []

    def failing(pixels, size):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # what a Ctrl-C mid-way raises
        return real(pixels, size)

    monkeypatch.setattr(fm, "encode_png", failing)
    parent = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        fm.build_tree(parent / "fm", source=source, train_per_class=2, val_per_class=1)
    assert len(calls) == 7 and os.listdir(parent) == []  # no tree, no temporary directory


def test_same_arguments_are_a_no_op_and_others_are_refused_unless_overwrite(tmp_path):
    source = synthetic_source(tmp_path / "src")
    out = tmp_path / "fm"
    first = fm.build_tree(out, source=source, train_per_class=2, val_per_class=1)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = fm.build_tree(out, source=source, train_per_class=2, val_per_class=1)
    assert first.built and not again.built and again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    # "all" and the explicit count of all images are the same tree.
    assert fm.build_tree(tmp_path / "all", source=source).manifest["arguments"] == (
        fm.build_tree(tmp_path / "all", source=source, train_per_class=6, val_per_class=3).manifest["arguments"]
    )

    kept = tree_files(out)
    with pytest.raises(DatasetError) as caught:
        fm.build_tree(out, source=source, train_per_class=3, val_per_class=1)
    assert "train_per_class=2" in str(caught.value) and "train_per_class=3" in str(caught.value)
    assert "--overwrite" in str(caught.value) and tree_files(out) == kept
    replaced = fm.build_tree(out, source=source, train_per_class=3, val_per_class=1, overwrite=True)
    assert replaced.built and len(tree_files(out)) == 10 * 3 + 10 * 1
    assert sorted(os.listdir(tmp_path)) == ["all", "fm", "src"]  # nothing left aside

    next(out.rglob("*.png")).unlink()
    with pytest.raises(DatasetError, match="manifest says 3.*--overwrite"):
        fm.build_tree(out, source=source, train_per_class=3, val_per_class=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a tree built by this command"):
        fm.build_tree(tmp_path / "other", source=source)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"train_per_class": 7}, "train_per_class"), ({"val_per_class": 0}, "val_per_class"), ({"size": 0}, "size"), ({"seed": -1}, "seed")],
)
def test_out_of_range_arguments_name_their_key(tmp_path, kwargs, key):
    source = synthetic_source(tmp_path / "src")
    with pytest.raises(ConfigError) as caught:
        fm.build_tree(tmp_path / "fm", source=source, **kwargs)
    assert caught.value.key == key and not (tmp_path / "fm").exists()


def test_data_command_builds_repeats_refuses_and_verifies(tmp_path, capsys):
    source = synthetic_source(tmp_path / "src")
    command = ["fashion-mnist", "--root", str(tmp_path / "root"), "--source", str(source), "--train-per-class", "2", "--val-per-class", "1", "--size", "10"]
    assert data_command.main(command) == 0 and "built (train 20, val 10 images of 10x10" in capsys.readouterr().out
    assert data_command.main(command) == 0 and "unchanged" in capsys.readouterr().out
    assert data_command.main(command + ["--seed", "1"]) == 1 and "--overwrite" in capsys.readouterr().err
    assert data_command.main(["verify-images", "fashion_mnist", "--root", str(tmp_path / "root")]) == 0
    assert "ok (30 images decoded)" in capsys.readouterr().out


# --- tree checks and their messages -------------------------------------------------------

HOW_TO = "run python -m experiments.data fashion-mnist"


def grey_png(path: Path, value: int, side: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side), value, dtype=np.uint8)).save(path)


def make_tree(root: Path, train: dict[str, int], val: dict[str, int], *, val_base: int = 100) -> Path:
    """A tree whose image number k (train from 0, val from ``val_base``) has all pixels k."""
    number = 0
    for split, classes in (("train", train), ("val", val)):
        number = 0 if split == "train" else val_base
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                grey_png(root / split / name / f"{number:03d}.png", number)
                number += 1
    return root


def flat_val(root: Path) -> None:
    make_tree(root, {"n01": 1, "n02": 1}, {})
    (root / "val").mkdir()
    grey_png(root / "val" / "ILSVRC2012_val_00000001.JPEG", 1)


def differing(root: Path) -> None:
    make_tree(root, {"n01": 1, "n02": 1, "n03": 1}, {"n01": 1, "n04": 1})


def empty_class(root: Path) -> None:
    make_tree(root, {"n01": 1, "n02": 1}, {"n01": 1, "n02": 1})
    for image in (root / "val" / "n02").iterdir():
        image.unlink()
    (root / "val" / "n02" / "readme.txt").write_text("not an image")


@pytest.mark.parametrize(
    "arrange, fragments",
    [
        pytest.param(lambda root: None, ["does not exist", "train/<class>/<image>"], id="missing root"),
        pytest.param(lambda root: make_tree(root, {"n01": 1}, {}), ["val is missing"], id="missing split"),
        pytest.param(flat_val, ["holds 1 image(s) directly", "ILSVRC2012_validation_ground_truth.txt", "valprep.sh"], id="flat val"),
        pytest.param(differing, ["differ", "only in train/: n02, n03", "only in val/: n04", "3 classes in train/ and 2"], id="class sets"),
        pytest.param(empty_class, ["1 class folder(s)", "val/n02", "hold no images"], id="empty class"),
        pytest.param(lambda root: (root / "train").mkdir(parents=True) or (root / "val").mkdir(), ["has no class folders"], id="no classes"),
    ],
)
def test_tree_errors_say_what_is_wrong_and_how_to_fix_it(tmp_path, arrange, fragments):
    root = tmp_path / "imagenet1k"
    arrange(root)
    with pytest.raises(DatasetError) as caught:
        check_image_folder(root, dataset="imagenet1k", how_to=HOW_TO)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("imagenet1k: ") and message.endswith(HOW_TO)
    for fragment in fragments:
        assert fragment in message


def test_classes_are_sorted_and_hidden_entries_ignored(tmp_path):
    root = make_tree(tmp_path / "t", {"b": 1, "a": 1}, {"a": 1, "b": 1})
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "val" / "a" / "._100.png").write_bytes(b"macOS resource fork")  # not an image, hidden
    assert check_image_folder(root, dataset="t", how_to=HOW_TO) == ["a", "b"]
    assert verify_images(root, dataset="t", how_to=HOW_TO) == 4


# --- loaders ------------------------------------------------------------------------------

# 4 classes; 24 training images (3 global batches of 8) and 13 val images (odd: uneven shards).
TRAIN, VAL = {"a": 6, "b": 6, "c": 6, "d": 6}, {"a": 3, "b": 3, "c": 3, "d": 4}
# Random crop with padding and a flip: visible augmentation that keeps the centre pixel
# (the image's number) inside the crop.
AUGMENT = T.Compose([T.RandomCrop(6, padding=1), T.RandomHorizontalFlip(), T.PILToTensor()])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "t", TRAIN, VAL)


def loaders(root: Path, **overrides) -> ImageLoaders:
    settings = dict(train_transform=AUGMENT, val_transform=T.PILToTensor(), local_batch=4, workers=0, seed=3,
                    rank=0, world_size=1, device=torch.device("cpu"), dataset="t", how_to=HOW_TO)
    return ImageLoaders(root, **{**settings, **overrides})


def numbers(images: torch.Tensor) -> list[int]:
    return images[:, 0, 3, 3].tolist()


def epoch_of(data: ImageLoaders, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.train_batches(epoch, skip))


def test_batches_are_the_same_with_any_number_of_workers_and_after_a_skip(tree):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    serial, parallel = loaders(tree), loaders(tree, workers=2)
    assert serial.steps_per_epoch == 6 and serial.classes == ["a", "b", "c", "d"] and serial.num_classes == 4
    for epoch in (1, 2):
        full = epoch_of(serial, epoch)
        assert len(full) == 6 and all(x.shape == (4, 3, 6, 6) and x.dtype == torch.uint8 for x, _ in full)
        for got in (epoch_of(parallel, epoch), epoch_of(parallel, epoch, skip=0)):
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, got, strict=True))
        for skip in (1, 5, 6):  # a resume inside the epoch sees the tail of the full epoch
            tail = epoch_of(parallel, epoch, skip)
            assert len(tail) == 6 - skip
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[skip:], tail, strict=True))
    one, two = epoch_of(serial, 1), epoch_of(serial, 2)
    assert [numbers(x) for x, _ in one] != [numbers(x) for x, _ in two]  # a new order each epoch
    # The augmentation is visible (padding zeros at some border) and differs with the seed.
    assert any((x[:, 0, 0, :] == 0).any() or (x[:, 0, :, 0] == 0).any() for x, _ in one)
    other = epoch_of(loaders(tree, seed=4), 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, other))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    # Labels are the class folder index of each image.
    for images, labels in one:
        assert [TRAIN_LABEL[n] for n in numbers(images)] == labels.tolist()


TRAIN_LABEL = {n: n // 6 for n in range(24)}


def test_skipped_batches_are_never_loaded(tree):
    data = loaders(tree)
    loaded = []
    real = data.train_set.loader
    data.train_set.loader = lambda path: loaded.append(path) or real(path)
    assert len(epoch_of(data, 1, skip=4)) == 2 and len(loaded) == 2 * 4


def test_train_shards_are_disjoint_and_the_global_batch_does_not_depend_on_the_world_size(tree):
    single = loaders(tree, local_batch=8)
    ranks = [loaders(tree, local_batch=4, rank=r, world_size=2) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 3
    for epoch in (1, 2):
        whole = epoch_of(single, epoch)
        parts = [epoch_of(r, epoch) for r in ranks]
        seen = [n for part in parts for x, _ in part for n in numbers(x)]
        assert len(seen) == len(set(seen)) == 24  # disjoint, and here every image once
        for b, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)  # same images, same crops
            assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)
            assert numbers(parts[0][b][0]) == [single.train_set[(epoch, i)][0][0, 3, 3].item() for i in ranks[0].train_indices(epoch, b)]


def test_drop_last_drops_the_partial_global_batch(tree):
    data = loaders(tree, local_batch=5)  # 24 images: 4 full batches of 5, 4 left out
    assert data.steps_per_epoch == 4
    seen = [n for x, _ in epoch_of(data, 1) for n in numbers(x)]
    assert len(seen) == len(set(seen)) == 20
    kept = loaders(tree, local_batch=5, drop_last=False)
    assert kept.steps_per_epoch == 5 and [len(y) for _, y in epoch_of(kept, 1)] == [5, 5, 5, 5, 4]
    with pytest.raises(ConfigError, match="exceeds the 24 training images"):
        loaders(tree, local_batch=13, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_shards_are_disjoint_and_cover_the_val_set(tree, world_size):
    shards = [[n for x, _ in loaders(tree, rank=r, world_size=world_size).val_batches() for n in numbers(x)] for r in range(world_size)]
    flat = [n for shard in shards for n in shard]
    assert sorted(flat) == list(range(100, 113)) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_named(tmp_path, workers):
    root = make_tree(tmp_path / "t", {"a": 4, "b": 4}, {"a": 1, "b": 1})
    broken = root / "train" / "b" / "005.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError) as caught:
        for _ in loaders(root, workers=workers, local_batch=8).train_batches(1):
            pass
    message = str(caught.value)
    assert message.startswith(f"{broken}: cannot be read as an image") and "\n" not in message
    with pytest.raises(DatasetError, match=f"1 of 10 images cannot be read: {broken}"):
        verify_images(root, dataset="t", how_to=HOW_TO)


def test_state_dict_holds_what_the_order_depends_on_and_refuses_another(tree):
    data = loaders(tree)
    state = data.state_dict()
    assert state == {"seed": 3, "train_samples": 24, "local_batch": 4, "world_size": 1}
    loaders(tree).load_state_dict(state)
    with pytest.raises(RunError, match="seed 3 in the checkpoint, 4 now"):
        loaders(tree, seed=4).load_state_dict(state)


def test_transforms_give_three_channel_tensors_of_the_crop_size():
    grey = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).convert("RGB")
    assert imagenet_train_transform()(grey).shape == imagenet_val_transform()(grey).shape == (3, 224, 224)
    small = grey.resize((32, 32))
    for transform in (small_train_transform(32, fm.MEAN, fm.STD), small_val_transform(32, fm.MEAN, fm.STD)):
        assert transform(small).shape == (3, 32, 32)
    centre = small_val_transform(32, (0.5,) * 3, (0.5,) * 3)(small)
    torch.testing.assert_close(centre, T.ToTensor()(small) * 2 - 1)


def test_topk_correct_counts_a_hand_computed_case():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.3],  # ranking 1, 3, 0, 2
            [0.8, 0.1, 0.7, 0.2],  # ranking 0, 2, 3, 1
            [0.2, 0.3, 0.4, 0.1],  # ranking 2, 1, 0, 3
        ]
    )
    labels = torch.tensor([1, 2, 3])
    # Row 0: top-1 hit. Row 1: label 2 is second. Row 2: label 3 is last (4th).
    assert topk_correct(logits, labels, ks=(1, 2, 3)) == {1: 1, 2: 2, 3: 2}
    assert topk_correct(logits, labels) == {1: 1, 5: 3}  # k = 5 > 4 classes: every row
    with pytest.raises(ValueError, match="ks must be integers >= 1"):
        topk_correct(logits, labels, ks=(0,))
