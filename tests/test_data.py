"""Datasets: real-format fixtures on disk, errors that name the key, deterministic augmentation."""

from __future__ import annotations


import boto3
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from gradyard.data import DataError, build_datasets
from gradyard.data.augment import Augmented
from gradyard.data.base import ImageDataset
from gradyard.job import JobError, parse_job
from conftest import ROOT
from testkit.datafiles import MAMMO, make_aclimdb, make_imagefolder, make_mnist

pytestmark = pytest.mark.unit


def spec_for(arch: str, source: str, fmt: str | None = None, augmentation=(), loss="auto",
             seed: int = 0, storage=None, **data):
    data = {"source": source, **({"format": fmt} if fmt else {}), **data}
    return parse_job({"name": "t", "model": {"arch": arch}, "data": data, "loss": loss,
                      "schedule": {"epochs": 1, "seed": seed}, "storage": storage or {},
                      "augmentation": list(augmentation)})


def stack(ds, n=None):
    items = [ds[i] for i in range(len(ds) if n is None else n)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# ---------------------------------------------------------------- fixtures in real formats


# ---------------------------------------------------------------- MNIST IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_as_images(tmp_path, gz):
    arrays = make_mnist(tmp_path / "mnist", gz)
    train, test, info = build_datasets(spec_for("lenet5", str(tmp_path / "mnist"), "idx"))
    assert (info.input_shape, info.num_classes, info.task) == ((1, 28, 28), 10, "multiclass")
    assert (len(train), len(test), info.train_size, info.test_size) == (20, 10, 20, 10)
    x, y = test[3]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == 3
    assert torch.equal(x[0], torch.from_numpy(arrays["t10k"][0][3]).float() / 255)


def test_idx_in_torchvision_layout_and_resized_for_other_models(tmp_path):
    make_mnist(tmp_path / "root" / "FashionMNIST" / "raw", gz=True)
    _, test, info = build_datasets(spec_for("tinyvgg", f"file://{tmp_path}/root", "idx"))
    assert info.input_shape == (3, 64, 64) and test[0][0].shape == (3, 64, 64)


def test_idx_wrong_magic_and_missing_files(tmp_path):
    make_mnist(tmp_path / "m", gz=False)
    labels = (tmp_path / "m" / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "m" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + labels[4:])
    with pytest.raises(DataError, match="is not an IDX file"):
        build_datasets(spec_for("lenet5", str(tmp_path / "m"), "idx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        build_datasets(spec_for("lenet5", str(tmp_path / "empty"), "idx"))
    assert str(err.value).startswith("data.source: no MNIST IDX files at")
    assert "train-images-idx3-ubyte[.gz]" in str(err.value)
    assert "--set data.source=synthetic" in str(err.value)
    with pytest.raises(DataError) as err:  # the folder itself is missing
        build_datasets(spec_for("lenet5", "/data/mnist", "idx"))
    assert str(err.value).startswith("data.source: nothing at /data/mnist (expected MNIST IDX "
                                     "files: train-images-idx3-ubyte[.gz], ")
    assert str(err.value).endswith("or run with --set data.source=synthetic.")


def test_remote_source_is_staged_once(tmp_path, s3):
    local = tmp_path / "mnist"
    make_mnist(local, gz=True)
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    prefix = f"staging-{tmp_path.name}/mnist"
    for f in local.iterdir():
        client.put_object(Bucket="gradyard-test", Key=f"{prefix}/{f.name}", Body=f.read_bytes())
    cache = tmp_path / "cache"
    url = f"s3://gradyard-test/{prefix}"
    spec = spec_for("lenet5", url, "idx", cache_dir=str(cache), storage={"endpoint_url": s3.endpoint})
    _, test, _ = build_datasets(spec)
    staged = [p for p in cache.iterdir() if p.is_dir()]
    assert len(staged) == 1 and (staged[0] / "t10k-images-idx3-ubyte.gz").is_file()
    for f in local.iterdir():  # a second build must not need the remote
        client.delete_object(Bucket="gradyard-test", Key=f"{prefix}/{f.name}")
    _, again, _ = build_datasets(spec)
    assert torch.equal(stack(test)[0], stack(again)[0])
    with pytest.raises(DataError, match="data.source: nothing at s3://gradyard-test/gone"):
        build_datasets(spec_for("lenet5", "s3://gradyard-test/gone", "idx", cache_dir=str(cache),
                                storage={"endpoint_url": s3.endpoint}))


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_resized_for_tinyvgg(tmp_path):
    make_imagefolder(tmp_path / "food")
    train, test, info = build_datasets(spec_for("tinyvgg", str(tmp_path / "food"), "imagefolder"))
    assert (info.input_shape, info.num_classes, len(train), len(test)) == ((3, 64, 64), 3, 9, 3)
    x, y = test[2]
    assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1 and int(y) == 2


def test_imagefolder_uses_efficientnet_weights_transforms(tmp_path):
    make_imagefolder(tmp_path / "food")
    _, test, info = build_datasets(
        spec_for("efficientnet_b0_transfer", str(tmp_path / "food"), "imagefolder"))
    assert info.input_shape == (3, 224, 224)
    reference = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
    with Image.open(tmp_path / "food" / "test" / "sushi" / "0.png") as im:
        expected = reference(im.convert("RGB"))
    # Same resize, crop and normalisation; we resize uint8 tensors, torchvision PIL images.
    assert torch.allclose(test[2][0], expected, atol=0.05)


def test_imagefolder_without_test_split_and_missing(tmp_path):
    make_imagefolder(tmp_path / "food", splits=("train",), per_class=5)
    train, test, _ = build_datasets(spec_for("tinyvgg", str(tmp_path / "food"), "imagefolder",
                                             test_fraction=0.2))
    assert (len(train), len(test)) == (12, 3)
    with pytest.raises(DataError, match=r"data.source: no images at .*/train/<class>/"):
        build_datasets(spec_for("tinyvgg", str(tmp_path), "imagefolder"))
    with pytest.raises(DataError, match="data.source: nothing at /no/such/folder"):
        build_datasets(spec_for("tinyvgg", "/no/such/folder", "imagefolder"))


# ---------------------------------------------------------------- IMDB


def test_aclimdb_vocabulary_padding_and_cutting(tmp_path):
    make_aclimdb(tmp_path)
    train, test, info = build_datasets(
        spec_for("lstm_sentiment", str(tmp_path), "aclimdb", max_length=8, vocab_size=16))
    assert (info.input_shape, info.vocab_size, info.task, len(train)) == ((8,), 16, "binary", 4)
    tokens, labels = stack(train)
    assert tokens.dtype == torch.int64 and labels.tolist() == [[0.0], [0.0], [1.0], [1.0]]
    # boring and great (3 each) lead the vocabulary (ids 2, 3), then the rest alphabetically:
    # a 4, acting 5, and 6, awful 7, dull 8, ...  Padding (0) goes in front.
    assert tokens[1].tolist() == [0, 0, 0, 0, 2, 2, 6, 8]  # boring boring and dull
    tokens, _ = stack(test)
    assert tokens[2].tolist() == [0, 0, 0, 0, 0, 0, 3, 1]  # great zebra (unknown: 1)
    assert tokens[3].tolist() == [4, 4, 4, 4, 4, 4, 4, 3]  # cut to its last 8 tokens
    _, _, again = build_datasets(
        spec_for("lstm_sentiment", str(tmp_path / "aclImdb"), "aclimdb", max_length=8))
    assert again.train_size == 4
    with pytest.raises(DataError, match="data.source: no aclImdb reviews at"):
        build_datasets(spec_for("lstm_sentiment", str(tmp_path / "aclImdb" / "train"), "aclimdb"))


# ---------------------------------------------------------------- tables


def test_mammographic_imputes_and_standardises(tmp_path):
    (tmp_path / "mammographic_masses.data").write_text(MAMMO)
    spec = spec_for("mlp", str(tmp_path), "mammographic", test_fraction=0.25)
    train, test, info = build_datasets(spec)
    assert (info.input_shape, info.task, len(train), len(test)) == ((4,), "binary", 15, 5)
    xtr, ytr = stack(train)
    xte, _ = stack(test)
    assert not torch.isnan(xtr).any() and not torch.isnan(xte).any()
    assert torch.allclose(xtr.mean(0), torch.zeros(4), atol=1e-5)
    assert ytr.dtype == torch.float32 and ytr.shape == (15, 1)
    again, _, _ = build_datasets(spec)
    assert torch.equal(xtr, stack(again)[0])
    other, _, _ = build_datasets(spec_for("mlp", str(tmp_path / "mammographic_masses.data"),
                                          "mammographic", test_fraction=0.25, seed=1))
    assert not torch.equal(xtr, stack(other)[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.source: no mammographic_masses.data at"):
        build_datasets(spec_for("mlp", str(tmp_path / "empty"), "mammographic"))
    with pytest.raises(DataError, match="data.source: nothing at .*elsewhere.data"):
        build_datasets(spec_for("mlp", str(tmp_path / "elsewhere.data"), "mammographic"))


@pytest.mark.parametrize("cell", ["?", "", "nan", "NA"])
def test_a_missing_csv_target_is_an_error_naming_row_and_column(tmp_path, cell):
    """A missing target used to become a class of its own, or turn the task into NaN regression."""
    rows = ["a,b,label"] + [f"{i},{i % 3},{'yes' if i % 2 else 'no'}" for i in range(10)]
    rows[5] = f"4,1,{cell}"  # line 6 of the file (the header is line 1)
    (tmp_path / "t.csv").write_text("\n".join(rows))
    with pytest.raises(DataError) as err:
        build_datasets(spec_for("mlp", str(tmp_path / "t.csv"), "csv"))
    assert "t.csv row 6, column 'label'" in str(err.value) and "cannot be missing" in str(err.value)


def test_bad_cells_and_empty_files_are_data_errors(tmp_path):
    (tmp_path / "f.csv").write_text("a,b,y\n1,x,0\n2,3,1\n4,5,0\n")
    with pytest.raises(DataError, match=r"f.csv row 2, column 'b': 'x' is not a number"):
        build_datasets(spec_for("mlp", str(tmp_path / "f.csv"), "csv"))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv is empty"):
        build_datasets(spec_for("mlp", str(tmp_path / "e.csv"), "csv"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mammographic_masses.data").write_text("")
    with pytest.raises(DataError, match="is empty"):
        build_datasets(spec_for("mlp", str(tmp_path / "m"), "mammographic"))
    (tmp_path / "m" / "mammographic_masses.data").write_text(MAMMO.replace("4,28,1,1,3,0", "4,28,1,1,3,2"))
    with pytest.raises(DataError, match=r"row 4, column 'severity': target '2' is not 0 \(benign\) or 1"):
        build_datasets(spec_for("mlp", str(tmp_path / "m"), "mammographic"))
    (tmp_path / "idx").mkdir()
    make_mnist(tmp_path / "idx", gz=True)
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read idx data"):
        build_datasets(spec_for("lenet5", str(tmp_path / "idx"), "idx"))


def test_links_out_of_the_dataset_are_not_followed(tmp_path):
    """An ImageFolder class directory (or one image) that is a link to elsewhere is refused by name."""
    make_imagefolder(tmp_path / "food")
    make_imagefolder(tmp_path / "secret")
    (tmp_path / "food" / "train" / "other").symlink_to(tmp_path / "secret" / "train" / "pizza")
    with pytest.raises(DataError) as err:
        build_datasets(spec_for("tinyvgg", str(tmp_path / "food"), "imagefolder"))
    assert "train/other is a symbolic link out of the dataset" in str(err.value)
    (tmp_path / "food" / "train" / "other").unlink()
    (tmp_path / "food" / "train" / "pizza" / "9.png").symlink_to(tmp_path / "secret" / "train" / "sushi" / "0.png")
    with pytest.raises(DataError, match="pizza/9.png is a symbolic link out of the dataset"):
        build_datasets(spec_for("tinyvgg", str(tmp_path / "food"), "imagefolder"))
    # A dataset root that is itself a link, with links inside it that stay inside: fine.
    (tmp_path / "food" / "train" / "pizza" / "9.png").unlink()
    (tmp_path / "food" / "train" / "pizza" / "9.png").symlink_to(tmp_path / "food" / "train" / "pizza" / "0.png")
    (tmp_path / "alias").symlink_to(tmp_path / "food")
    train, _, _ = build_datasets(spec_for("tinyvgg", str(tmp_path / "alias"), "imagefolder"))
    assert len(train) == 10


def test_csv_targets(tmp_path):
    rows = ["a,b,label"] + [f"{i},{(i * 7) % 5 if i % 4 else '?'},{'yes' if i % 2 else 'no'}"
                            for i in range(20)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    train, test, info = build_datasets(spec_for("mlp", str(tmp_path / "t.csv"), "csv"))
    assert (info.input_shape, info.task, len(train) + len(test)) == ((2,), "binary", 20)
    assert not torch.isnan(stack(train)[0]).any()
    rows = ["x,y"] + [f"{i},{i * 0.5 + 0.1}" for i in range(20)]
    (tmp_path / "r.csv").write_text("\n".join(rows))
    _, _, info = build_datasets(spec_for("linear", str(tmp_path / "r.csv"), "csv"))
    assert info.task == "regression"


# ---------------------------------------------------------------- built-in and synthetic


def test_builtin_sets_are_deterministic():
    for arch, source in (("mlp", "circles"), ("mlp", "blobs"), ("lenet5", "digits"),
                         ("mlp", "breast_cancer")):
        spec = spec_for(arch, source, num_samples=100)
        a, b = build_datasets(spec), build_datasets(spec)
        assert torch.equal(stack(a[0], 20)[0], stack(b[0], 20)[0]), source
        assert a[2] == b[2]
    train, test, info = build_datasets(spec_for("lenet5", "digits"))
    assert (info.input_shape, info.num_classes, len(train) + len(test)) == ((1, 28, 28), 10, 1797)
    x, _ = test[0]
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5


def nearest_centroid_accuracy(train, test) -> float:
    xtr, ytr = stack(train)
    xte, yte = stack(test)
    xtr, xte = xtr.flatten(1).float(), xte.flatten(1).float()
    ytr, yte = ytr.reshape(len(ytr), -1)[:, 0].long(), yte.reshape(len(yte), -1)[:, 0].long()
    classes = ytr.unique()
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in classes])
    pred = classes[torch.cdist(xte, centroids).argmin(1)]
    return (pred == yte).float().mean().item()


def bag_of_words(ds, vocab):
    x, y = stack(ds)
    counts = torch.zeros(len(x), vocab).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float))
    counts[:, 0] = 0
    return list(zip(counts, y))


def test_synthetic_has_learnable_signal():
    train, test, info = build_datasets(spec_for("mlp", "synthetic", num_samples=200))
    assert info.synthetic and info.input_shape == (2,) and info.task == "binary"
    assert nearest_centroid_accuracy(train, test) > 0.8
    train, test, info = build_datasets(spec_for("tinyvgg", "synthetic", num_samples=90))
    assert info.input_shape == (3, 64, 64) and info.num_classes == 3
    assert nearest_centroid_accuracy(train, test) > 0.8
    train, test, info = build_datasets(spec_for("lstm_sentiment", "synthetic", num_samples=100,
                                                max_length=32, vocab_size=200))
    assert info.input_shape == (32,) and info.vocab_size == 200
    assert nearest_centroid_accuracy(bag_of_words(train, 200), bag_of_words(test, 200)) > 0.8
    train, test, info = build_datasets(spec_for("linear", "synthetic", num_samples=100))
    assert info.task == "regression" and info.input_shape == (20,)
    (xtr, ytr), (xte, yte) = stack(train), stack(test)
    w = torch.linalg.lstsq(xtr, ytr).solution
    assert ((xte @ w - yte) ** 2).mean() < 0.1 * yte.var()


def test_synthetic_follows_image_size_and_loss():
    _, test, info = build_datasets(spec_for("mlp", "synthetic", image_size=16, num_samples=16))
    assert info.input_shape == (1, 16, 16) and test[0][0].shape == (1, 16, 16)
    _, test, info = build_datasets(spec_for("tinyvgg", "synthetic", loss="bce", num_samples=16))
    assert info.task == "binary" and test[0][1].shape == (1,)


@pytest.mark.parametrize("arch, fmt, shape, task, outputs", [
    ("mlp", "idx", (1, 28, 28), "multiclass", 10),       # mnist-shallow without its files
    ("mlp", "mammographic", (4,), "binary", 1),
    ("tinyvgg", "imagefolder", (3, 64, 64), "multiclass", 3),
    ("alexnet", "imagefolder", (3, 224, 224), "multiclass", 3),
    ("lstm_sentiment", "aclimdb", (256,), "binary", 1),
])
def test_synthetic_keeps_the_shapes_of_the_jobs_format(arch, fmt, shape, task, outputs):
    _, test, info = build_datasets(spec_for(arch, "synthetic", fmt, num_samples=8))
    assert (info.input_shape, info.task, info.num_classes) == (shape, task, outputs)
    assert test[0][0].shape == shape


# ---------------------------------------------------------------- augmentation

AUGMENT = [{"name": "flip"}, {"name": "rotation", "degrees": 30},
           {"name": "color_jitter", "hue": 0.1}, {"name": "trivial_augment_wide"},
           {"name": "rand_augment"}]


def test_augmentation_is_a_function_of_seed_epoch_index():
    spec = spec_for("tinyvgg", "synthetic", augmentation=AUGMENT, num_samples=16, image_size=32)
    train, test, _ = build_datasets(spec)
    assert isinstance(train, Augmented) and isinstance(test, ImageDataset)
    rng_before = torch.get_rng_state()
    first = train[3][0]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's stream is untouched
    assert torch.equal(first, train[3][0])
    assert not torch.equal(first, train.base[3][0])  # it was augmented
    train.set_epoch(1)
    assert not torch.equal(first, train[3][0])
    fresh, _, _ = build_datasets(spec)  # e.g. a resumed run
    assert torch.equal(fresh[3][0], first)
    # Loader workers don't change what a sample looks like.
    fresh.set_epoch(1)
    serial = torch.cat([x for x, _ in DataLoader(fresh, batch_size=4)])
    parallel = torch.cat([x for x, _ in DataLoader(fresh, batch_size=4, num_workers=2)])
    assert torch.equal(serial, parallel)


def _normalised_set():
    """RGB images held in memory, normalised with ImageNet's mean and std (as for pretrained nets)."""
    from gradyard.data.base import ImageGeometry, TensorImages

    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    geometry = ImageGeometry(3, 16, None, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return Augmented(ImageDataset(TensorImages(images), torch.arange(40) % 3, geometry), None, 0)


@pytest.mark.parametrize("case,fast", [
    ("fashion_cnn synthetic", True),    # in memory at the model's shape: one op per batch
    ("normalised", True),               # mean and std applied to the whole batch
    ("lenet5 digits", False),           # 8x8 digits resized per image to 32x32
])
def test_batched_fetch_gives_the_per_sample_values_to_the_bit(case, fast):
    if case == "normalised":
        train = _normalised_set()
    else:
        arch, source = case.split()
        train, _, _ = build_datasets(spec_for(arch, source, num_samples=40) if source == "synthetic"
                                     else spec_for(arch, source))
    assert isinstance(train, Augmented) and (train.base.raw_batch([0]) is not None) == fast
    order = [5, 0, 17, 3, 9, 2, 30, 11]
    x, y = next(iter(DataLoader(train, batch_size=len(order), sampler=order)))
    one_by_one = [train[i] for i in order]
    assert torch.equal(x, torch.stack([a for a, _ in one_by_one]))
    assert torch.equal(y, torch.stack([b for _, b in one_by_one]))
    assert x.dtype == torch.float32 and x.is_contiguous()


def test_augmentation_is_train_only_and_uint8_safe_on_grayscale():
    spec = spec_for("lenet5", "digits", augmentation=AUGMENT)
    train, test, _ = build_datasets(spec)
    plain_train, plain_test, _ = build_datasets(spec_for("lenet5", "digits"))
    assert torch.equal(stack(test, 5)[0], stack(plain_test, 5)[0])
    assert not torch.equal(stack(train, 5)[0], stack(plain_train, 5)[0])
    x, _ = train[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_augmentation_rejected_for_tabular_and_text(tmp_path):
    with pytest.raises(JobError, match="augmentation: only image data can be augmented"):
        spec_for("mlp", "circles", augmentation=[{"name": "flip"}])
    with pytest.raises(JobError, match="augmentation: .* gives text data"):
        spec_for("lstm_sentiment", "synthetic", augmentation=[{"name": "flip"}])


def test_staging_reports_progress_through_fsspecs_batched_get(tmp_path, s3, capsys, monkeypatch):
    """A tree of many files is staged in one concurrent fs.get with line-based progress (each line a
    count of files, never a carriage-return bar); a copy that is over at once stays quiet."""
    import gradyard.progress as progress

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    prefix = f"progress-{tmp_path.name}/tree"
    for i in range(60):
        client.put_object(Bucket="gradyard-test", Key=f"{prefix}/c{i % 3}/f{i:03d}.txt", Body=b"x" * 10)
    ticks = iter(range(0, 10_000, 3))  # a clock that moves 3 s per reading: every update is "a while later"
    monkeypatch.setattr(progress, "now", lambda: next(ticks))
    from gradyard.data.staging import stage

    path = stage(f"s3://gradyard-test/{prefix}", cache_dir=str(tmp_path / "cache"), endpoint_url=s3.endpoint)
    assert len(list(path.rglob("*.txt"))) == 60
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("staging ")]
    assert lines and "\r" not in "".join(lines)
    assert lines[-1].startswith(f"staging s3://gradyard-test/{prefix}: 60/60 files done")
    assert all("/60 files" in ln for ln in lines)

    monkeypatch.setattr(progress, "now", lambda: 0.0)  # instant: nothing to say
    stage(f"s3://gradyard-test/{prefix}", cache_dir=str(tmp_path / "cache2"), endpoint_url=s3.endpoint)
    assert "staging" not in capsys.readouterr().err


@pytest.mark.unit
def test_builtin_sets_and_splits_are_scikit_learns_own_without_importing_it():
    """gradyard makes circles, blobs, breast_cancer, digits and every train/test split without importing
    scikit-learn (2.4 s of CPU per worker, paid again at each restart): draw for draw the same arrays."""
    import subprocess
    import sys

    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    from gradyard.data import sklearn_compat as compat

    for n, seed in [(1000, 42), (7, 0), (513, 2026)]:
        for ours, theirs in [(compat.make_circles(n, noise=0.1, factor=0.5, random_state=seed),
                              datasets.make_circles(n_samples=n, noise=0.1, factor=0.5, random_state=seed)),
                             (compat.make_blobs(n, n_features=2, centers=4, cluster_std=1.5, random_state=seed),
                              datasets.make_blobs(n_samples=n, n_features=2, centers=4, cluster_std=1.5,
                                                  random_state=seed))]:
            assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(ours, theirs))
    bc, dg = datasets.load_breast_cancer(), datasets.load_digits()
    assert all(np.array_equal(a, b) for a, b in zip(compat.load_breast_cancer(), (bc.data, bc.target)))
    assert all(np.array_equal(a, b) for a, b in zip(compat.load_digits(), (dg.images, dg.target)))

    rng = np.random.default_rng(3)
    labels = {"balanced": np.repeat([0, 1], 50), "skewed": np.array([0] * 90 + [1] * 7 + [2] * 3),
              "ties": rng.integers(0, 7, 101), "strings": np.array(list("abcab") * 9),
              "one member": np.array([0] * 20 + [1])}
    for name, y in labels.items():
        for fraction in (0.2, 0.25, 0.1, 0.5):
            for seed in (0, 42, 7):
                for stratify in (y, None):
                    try:
                        want = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed,
                                                stratify=stratify)
                    except ValueError:
                        with pytest.raises(ValueError):
                            compat.train_test_split(len(y), fraction, seed, stratify)
                        continue
                    got = compat.train_test_split(len(y), fraction, seed, stratify)
                    assert all(np.array_equal(a, b) for a, b in zip(got, want)), (name, fraction, seed)

    # and a job's data is made without it (nor torchvision: it loads when an image is first resized)
    code = ("import sys; from gradyard.job import load_job; from gradyard.data import build_datasets; "
            "[build_datasets(load_job(f'jobs/{j}.yaml')) for j in ('circles', 'blobs', 'breast-cancer-mlp', "
            "'mnist-shallow')]; print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
