"""The model catalogue: every entry builds and trains a step; pretrained weights and job checks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import inspect

from conftest import JOBS
from gradyard.catalogue import CATALOGUE, check_job
from gradyard.data import DataInfo
from gradyard.job import JobError, parse_job
from gradyard.models import BUILDERS, ModelError, build_model, builder_params, count_parameters

pytestmark = pytest.mark.unit


def job(arch: str, source: str = "synthetic", **sections) -> dict:
    doc = {"name": "t", "model": {"arch": arch}, "data": {"source": source},
           "schedule": {"epochs": 1}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    return doc


def default_info(entry, **over) -> DataInfo:
    fields = dict(name="t", input_kind=entry.input_kind, input_shape=entry.default_input_shape,
                  num_classes=entry.default_num_classes, task=entry.task, synthetic=True,
                  vocab_size=50 if entry.input_kind == "text" else None)
    fields.update(over)
    return DataInfo(**fields)


def batch(info: DataInfo, n: int = 2) -> torch.Tensor:
    if info.input_kind == "text":
        return torch.randint(0, info.vocab_size, (n, *info.input_shape))
    return torch.randn(n, *info.input_shape)


@pytest.mark.parametrize("arch", sorted(CATALOGUE))
def test_every_entry_builds_and_takes_a_training_step(arch):
    torch.manual_seed(0)
    entry = CATALOGUE[arch]
    info = default_info(entry)
    model = BUILDERS[entry.arch](info)
    out = model(batch(info, 2))
    assert out.shape == (2, info.num_classes if info.task == "multiclass" else 1)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert entry.summary and "\n" not in entry.summary
    assert set(entry.accepts) >= {entry.input_kind}


def test_efficientnet_features_frozen_and_classifier_replaced():
    entry = CATALOGUE["efficientnet_b0_transfer"]
    model = BUILDERS[entry.arch](default_info(entry, num_classes=5), dropout=0.3)
    assert all(not p.requires_grad for p in model.features.parameters())
    drop, head = model.classifier
    assert isinstance(drop, nn.Dropout) and drop.p == 0.3
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (1280, 5)
    total, trainable = count_parameters(model)
    assert trainable == 1280 * 5 + 5 < total


def test_efficientnet_preprocess_is_the_weights_own():  # the catalogue's copy of torchvision's transforms
    p = CATALOGUE["efficientnet_b0_transfer"].preprocess
    t = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
    assert (p.resize, p.crop, p.interpolation) == (t.resize_size[0], t.crop_size[0], t.interpolation.value)
    assert p.mean == tuple(t.mean) and p.std == tuple(t.std)


def test_efficientnet_pretrained_loads_before_the_head_is_replaced(tmp_path):
    reference = torchvision.models.efficientnet_b0(weights=None)
    with torch.no_grad():
        reference.features[0][0].weight.fill_(0.125)
        reference.features[7][0].block[3][1].running_mean.fill_(-3.0)
    path = tmp_path / "effnet.pt"
    torch.save(reference.state_dict(), path)
    for url in (str(path), f"file://{path}"):
        spec = parse_job(job("efficientnet_b0_transfer", model={"pretrained": url}))
        model = build_model(spec, default_info(CATALOGUE["efficientnet_b0_transfer"]))
        assert torch.all(model.features[0][0].weight == 0.125)
        assert torch.all(model.features[7][0].block[3][1].running_mean == -3.0)
        assert model.classifier[1].out_features == 3


def test_pretrained_that_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "lenet.pt"
    entry = CATALOGUE["lenet5"]
    torch.save(BUILDERS[entry.arch](default_info(entry)).state_dict(), path)
    spec = parse_job(job("efficientnet_b0_transfer", model={"pretrained": str(path)}))
    with pytest.raises(ModelError, match=r"model\.pretrained: .*do not fit efficientnet_b0"):
        build_model(spec, default_info(CATALOGUE["efficientnet_b0_transfer"]))
    spec = parse_job(job("lenet5", model={"pretrained": str(tmp_path / "nope.pt")}))
    with pytest.raises(ModelError, match=r"model\.pretrained: no weights file at .*nope\.pt"):
        build_model(spec, default_info(entry))


def test_other_models_load_a_full_state_dict(tmp_path):
    entry = CATALOGUE["lenet5"]
    info = default_info(entry)
    torch.manual_seed(1)
    source = BUILDERS[entry.arch](info)
    # As a DDP-wrapped model inside a checkpoint dict would save it.
    wrapped = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pt")
    spec = parse_job(job("lenet5", model={"pretrained": str(tmp_path / "w.pt")}))
    torch.manual_seed(2)
    loaded = build_model(spec, info)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_regularization_overrides_model_params():
    spec = parse_job(job("mlp", model={"params": {"hidden": [8, 4], "dropout": 0.1}},
                         regularization={"dropout": 0.3, "batch_norm": True}))
    model = build_model(spec, default_info(CATALOGUE["mlp"]))
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.3, 0.3]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 2


def test_layer_sizes_follow_the_documented_models():
    def linear_in(model):
        return [m.in_features for m in model.modules() if isinstance(m, nn.Linear)][0]

    for arch, features in (("fashion_cnn", 10 * 7 * 7), ("tinyvgg", 10 * 13 * 13),
                           ("lenet5", 16 * 5 * 5)):
        assert linear_in(BUILDERS[arch](default_info(CATALOGUE[arch]))) == features
    shallow = BUILDERS["mlp"](
        default_info(CATALOGUE["mlp"], input_shape=(1, 28, 28), num_classes=10, task="multiclass"),
        hidden=[100], activation="sigmoid")
    assert [type(m).__name__ for m in shallow] == ["Flatten", "Linear", "Sigmoid", "Linear"]
    assert (shallow[1].in_features, shallow[3].out_features) == (784, 10)


@pytest.mark.parametrize("doc, message", [
    (job("foo"), "model.arch: unknown model 'foo'; allowed: alexnet, efficientnet_b0_transfer,"),
    (job("mlp", model={"params": {"hiden": [3]}}),
     "model.params.hiden: unknown parameter for mlp; "
     "allowed: hidden, activation, dropout, batch_norm"),
    (job("linear", model={"params": {"state_dict": {}}}),
     "model.params.state_dict: unknown parameter for linear; allowed: none"),
    (job("linear", regularization={"dropout": 0.5}),
     "regularization.dropout: linear has no dropout setting; models that have one: alexnet,"),
    (job("lstm_sentiment", "digits"),
     "data.source: 'digits' gives image data, but lstm_sentiment takes text data"),
    (job("lenet5", "/x", data={"format": "mammographic"}),
     "data.source: '/x' gives tabular data, but lenet5 takes image data"),
])
def test_check_job_names_the_key(doc, message):
    with pytest.raises(JobError) as err:
        parse_job(doc)
    assert message in str(err.value)


def test_check_job_accepts_good_jobs():
    spec = parse_job(job("mlp", "digits", model={"params": {"hidden": [16]}}))
    assert check_job(spec) is None
    assert check_job(parse_job(job("efficientnet_b0_transfer", "/d", data={"format": "imagefolder"}))) is None


def test_bad_activation_is_refused_at_validation():
    with pytest.raises(JobError, match=r"model.params.activation: unknown activation; allowed: relu, sigmoid, "
                                       r"tanh \(got 'gelu'\)"):
        parse_job(job("mlp", model={"params": {"activation": "gelu"}}))


@pytest.mark.parametrize("arch", sorted(CATALOGUE))
def test_the_catalogue_describes_each_builder_exactly(arch):
    """The torch-free catalogue (what `gradyard validate` checks) and the builders cannot drift."""
    entry = CATALOGUE[arch]
    assert list(entry.params) == builder_params(arch)
    defaults = {n: p.default for n, p in inspect.signature(BUILDERS[arch]).parameters.items()
                if n in entry.params}
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.params.items()} == defaults


@pytest.mark.integration  # builds AlexNet and EfficientNet twice: out of the seconds-long fast lane
@pytest.mark.parametrize("job", sorted(p.stem for p in JOBS.glob("*.yaml")))
def test_synthetic_data_builds_the_same_model_as_the_real_data(job, tmp_path_factory):
    """`--set data.source=synthetic` on any shipped job: data of the shape the job's own data has, so
    the same model (parameter count) as with its real files or built-in source."""
    from gradyard.data import build_datasets
    from gradyard.job import load_job
    from testkit.datafiles import real_data_overrides, write_job_datasets

    root = tmp_path_factory.getbasetemp() / "job-datasets"
    if not root.exists():
        write_job_datasets(root)
    real = load_job(JOBS / f"{job}.yaml", real_data_overrides(job, root))
    fake = load_job(JOBS / f"{job}.yaml", [o for o in real_data_overrides(job, root)
                                           if not o.startswith(("data.source=", "data.format="))]
                    + ["data.source=synthetic", "data.num_samples=16"])
    counts = []
    for spec in (real, fake):
        _, _, info = build_datasets(spec)
        counts.append((count_parameters(build_model(spec, info)), info.input_shape, info.num_classes))
    assert counts[0] == counts[1], counts
