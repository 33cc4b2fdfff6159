"""The builders of the documented models (:mod:`gradyard.catalogue` describes them without torch).

A builder takes the :class:`gradyard.data.DataInfo` of the data it will see plus
the job's `model.params`, and returns an ``nn.Module`` whose forward maps a
batch ``(B, *info.input_shape)`` to logits ``(B, num_classes)``; binary and
regression models return ``(B, 1)`` (raw logits: the trainer applies
BCEWithLogits).

Pretrained weights (`model.pretrained`) are read through the storage seam from
a local path, file:// or s3:// URL, never from the internet.  For
`efficientnet_b0_transfer` they are torchvision's ImageNet state_dict, loaded
into the full network before its classifier is replaced.  For every other
model they are a complete state_dict of that model (for instance the weights
of an earlier gradyard run), loaded strictly.
"""

from __future__ import annotations

import inspect
import io
import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import nn

from gradyard.catalogue import CATALOGUE, check_job, model_params
from gradyard.job import JobError
from gradyard.storage import StorageError, open_storage, redact

if TYPE_CHECKING:
    from gradyard.data import DataInfo
    from gradyard.job import JobSpec


class ModelError(JobError):
    """A model that cannot be built as the job asks; the message names the job key."""


# ---------------------------------------------------------------- helpers


def _out_features(info: "DataInfo") -> int:
    return 1 if info.task in ("binary", "regression") else info.num_classes


def _flat(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _flat_size(body: nn.Module, input_shape: Sequence[int]) -> int:
    """Features after `body`, from a dry forward rather than hand arithmetic."""
    was_training = body.training
    body.eval()  # batch norm would refuse a batch of one in training mode
    with torch.no_grad():
        out = body(torch.zeros(1, *input_shape))
    body.train(was_training)
    return out[0].numel()


_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _conv_block(c_in: int, c_out: int, padding: int, batch_norm: bool) -> nn.Sequential:
    """[Conv3x3 → ReLU → Conv3x3 → ReLU → MaxPool2x2], as in the learnpytorch.io models."""
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, kernel_size=3, stride=1, padding=padding))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU())
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- builders


def mlp(info: "DataInfo", hidden: Sequence[int] = (64,), activation: str = "relu",
        dropout: float = 0.0, batch_norm: bool = False) -> nn.Module:
    """Flatten → [Linear → (BatchNorm) → activation → (Dropout)] per hidden size → Linear."""
    if activation not in _ACTIVATIONS:
        raise ModelError(f"model.params.activation: unknown activation {activation!r}; "
                         f"allowed: {', '.join(_ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat(info.input_shape)
    for h in hidden:
        layers.append(nn.Linear(width, int(h)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(h)))
        layers.append(_ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, _out_features(info)))
    return nn.Sequential(*layers)


def lenet5(info: "DataInfo", dropout: float = 0.0, batch_norm: bool = False) -> nn.Module:
    """LeNet-5: conv 6@5x5 (pad 2) → pool → conv 16@5x5 → pool → 120 → 84 → classes."""
    c = info.input_shape[0]
    bn = (lambda n: [nn.BatchNorm2d(n)]) if batch_norm else (lambda n: [])
    features = nn.Sequential(
        nn.Conv2d(c, 6, kernel_size=5, padding=2), *bn(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5), *bn(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(
        features,
        nn.Linear(_flat_size(features, info.input_shape), 120), nn.ReLU(), *drop,
        nn.Linear(120, 84), nn.ReLU(), *drop,
        nn.Linear(84, _out_features(info)),
    )


def fashion_linear(info: "DataInfo", hidden_units: int = 10) -> nn.Module:
    """FashionMNISTModelV0 (learnpytorch.io): Flatten → Linear → Linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(info.input_shape), hidden_units),
                         nn.Linear(hidden_units, _out_features(info)))


def fashion_nonlinear(info: "DataInfo", hidden_units: int = 10) -> nn.Module:
    """FashionMNISTModelV1: Flatten → Linear → ReLU → Linear.

    The course also puts a ReLU after the last layer; it clips negative logits
    and slows learning, so it is left out here.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(info.input_shape), hidden_units),
                         nn.ReLU(), nn.Linear(hidden_units, _out_features(info)))


class _TwoBlockCNN(nn.Module):
    """Two conv blocks and a linear classifier: FashionMNISTModelV2 and TinyVGG."""

    def __init__(self, info: "DataInfo", hidden_units: int, padding: int,
                 dropout: float, batch_norm: bool):
        super().__init__()
        self.block_1 = _conv_block(info.input_shape[0], hidden_units, padding, batch_norm)
        self.block_2 = _conv_block(hidden_units, hidden_units, padding, batch_norm)
        body = nn.Sequential(self.block_1, self.block_2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            *([nn.Dropout(dropout)] if dropout else []),
            nn.Linear(_flat_size(body, info.input_shape), _out_features(info)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block_2(self.block_1(x)))


def fashion_cnn(info: "DataInfo", hidden_units: int = 10, dropout: float = 0.0,
                batch_norm: bool = False) -> nn.Module:
    """FashionMNISTModelV2 (learnpytorch.io, after TinyVGG): padding 1, 28x28 → 7x7."""
    return _TwoBlockCNN(info, hidden_units, 1, dropout, batch_norm)


def tinyvgg(info: "DataInfo", hidden_units: int = 10, dropout: float = 0.0,
            batch_norm: bool = False) -> nn.Module:
    """TinyVGG (CNN Explainer, learnpytorch.io 04): padding 0, 64x64 → 13x13."""
    return _TwoBlockCNN(info, hidden_units, 0, dropout, batch_norm)


class _LSTMSentiment(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, lstm_units: Sequence[int],
                 dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        sizes = [embed_dim, *[int(u) for u in lstm_units]]
        self.lstms = nn.ModuleList(nn.LSTM(a, b, batch_first=True)
                                   for a, b in zip(sizes, sizes[1:]))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(sizes[-1], 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for lstm in self.lstms:
            x, _ = lstm(x)          # every layer returns the full sequence...
            x = self.dropout(x)
        return self.head(x[:, -1])  # ...and the head reads the last step (padding is in front)


def lstm_sentiment(info: "DataInfo", embed_dim: int = 64, lstm_units: Sequence[int] = (128, 64),
                   dropout: float = 0.0) -> nn.Module:
    """Embedding → LSTM(128, full sequence) → LSTM(64, last step) → Linear(1); binary."""
    if not info.vocab_size:
        raise ModelError("lstm_sentiment needs text data with a vocabulary (data.vocab_size)")
    if not lstm_units:
        raise ModelError("model.params.lstm_units: needs at least one LSTM layer")
    return _LSTMSentiment(info.vocab_size, embed_dim, lstm_units, dropout)


def alexnet(info: "DataInfo", dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet, randomly initialised."""
    import torchvision  # here, not at the top: importing it costs every job's workers ~2 s of CPU

    return torchvision.models.alexnet(weights=None, num_classes=_out_features(info),
                                      dropout=dropout)


def efficientnet_b0_transfer(info: "DataInfo", dropout: float = 0.2, *,
                             state_dict: Optional[dict] = None) -> nn.Module:
    """EfficientNet-B0 feature extractor (frozen) with a new Dropout + Linear head.

    Weights load into the full ImageNet network first, so every key must fit;
    the old 1000-class classifier is then discarded by the replacement.
    """
    import torchvision

    model = torchvision.models.efficientnet_b0(weights=None)
    if state_dict is not None:
        _load_strict(model, state_dict, "efficientnet_b0")
    for p in model.features.parameters():
        p.requires_grad = False
    model.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                     nn.Linear(1280, _out_features(info)))
    return model


def linear(info: "DataInfo") -> nn.Module:
    """One Linear layer (the classic DDP tutorial's model: 20 features → 1)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(info.input_shape), _out_features(info)))


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": alexnet, "efficientnet_b0_transfer": efficientnet_b0_transfer, "fashion_cnn": fashion_cnn,
    "fashion_linear": fashion_linear, "fashion_nonlinear": fashion_nonlinear, "lenet5": lenet5,
    "linear": linear, "lstm_sentiment": lstm_sentiment, "mlp": mlp, "tinyvgg": tinyvgg,
}
"""The builder of every catalogue entry (gradyard.catalogue describes them without torch)."""


def builder_params(arch: str) -> list[str]:
    """The ``model.params`` names a builder takes, from its signature (a test compares the catalogue)."""
    sig = inspect.signature(BUILDERS[arch])
    return [n for n, p in sig.parameters.items()
            if n not in ("info", "state_dict") and p.kind is not p.VAR_KEYWORD]


# ---------------------------------------------------------------- job checks and building


def build_model(spec: "JobSpec", info: "DataInfo") -> nn.Module:
    """Build the job's model for data described by `info`, with pretrained weights if set."""
    problem = check_job(spec)
    if problem:
        raise ModelError(problem)
    entry = CATALOGUE[spec.model.arch]
    builder = BUILDERS[entry.arch]
    params = model_params(spec)
    state = None
    if spec.model.pretrained:
        state = load_state_dict(spec.model.pretrained, spec.storage.endpoint_url, spec.storage.region)
    try:
        if entry.takes_pretrained_state:
            return builder(info, **params, state_dict=state)
        model = builder(info, **params)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model.params: cannot build {entry.arch}: {exc}") from None
    if state is not None:
        _load_strict(model, state, entry.arch)
    return model


def load_state_dict(url: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> dict:
    """Read a state_dict from a local path, file:// or s3:// URL (tensors only, on the CPU).

    Through the storage seam: the job's endpoint, the retry policy, redacted messages.
    """
    shown = redact(url)
    try:
        weights = open_storage(url, endpoint_url, region)
        blob = weights.read_bytes(weights.root_path)
    except (FileNotFoundError, IsADirectoryError):
        raise ModelError(f"model.pretrained: no weights file at {shown}") from None
    except StorageError as exc:
        raise ModelError(f"model.pretrained: {exc}") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors have many types
        raise ModelError(f"model.pretrained: {shown} is not a PyTorch state_dict "
                         f"({type(exc).__name__}: {redact(str(exc))[:200]})") from None
    # Accept {"model": sd} / {"state_dict": sd} wrappers and DDP's "module." prefix.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"model.pretrained: {shown} holds a {type(state).__name__}, "
                         "not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_strict(model: nn.Module, state: dict, what: str) -> None:
    # strict=False only to report missing and unexpected keys together; any is an error.
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"model.pretrained: the weights do not fit {what}: {exc}") from None
    bad = []
    if result.missing_keys:
        bad.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        bad.append(f"unexpected {_few(result.unexpected_keys)}")
    if bad:
        raise ModelError(f"model.pretrained: the weights do not fit {what}: {'; '.join(bad)}")


def _few(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
