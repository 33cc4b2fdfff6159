"""Fuzzing the untrusted inputs: mutated job files, data files in every format, URLs.

Property: never a traceback.  Each input is either used (a valid job, a loaded dataset) or refused
with gradyard's own error (JobError / DataError), whose message names what is wrong.  Over 1,000
generated cases per run, derandomized so CI sees the same ones every time.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import JOBS
from gradyard.job import JobError, JobSpec, load_job
from gradyard.storage import redact
from gradyard.storage.urls import problem

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SHIPPED = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(JOBS.glob("*.yaml"))}


def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["s3://AKIA:secret@bucket/x", "http://example.com/d", "s3://bucket/x?X-Amz-Signature=s",
                     "../../../etc", "file:///etc/passwd", "synthetic", "digits", "idx", "csv", "sgd",
                     "adamw", "PACK", "SPREAD", "test_accuracy", "nan", "inf", "-1", "1e400", "\x00"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=8)


@st.composite
def mutated_jobs(draw):
    name = draw(st.sampled_from(sorted(SHIPPED)))
    doc = yaml.safe_load(yaml.safe_dump(SHIPPED[name]))  # a deep copy
    paths = list(_paths(doc))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths)) if paths and draw(st.booleans()) else tuple(
            draw(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)))
        node = doc
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {}) if not isinstance(node.get(key), dict) else node[key]
        if isinstance(node, dict):
            if draw(st.booleans()) and path[-1] in node:
                del node[path[-1]]
            else:
                node[path[-1]] = draw(values)
    return doc


def _refused_cleanly(call) -> None:
    try:
        call()
    except JobError as exc:
        msg = str(exc)
        assert msg and "Traceback" not in msg
        assert "secret@" not in msg  # credentials never echoed


@FUZZ
@given(doc=mutated_jobs())
def test_mutated_job_files_are_valid_or_refused_by_name(doc):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))

        def load():
            spec = load_job(path)
            assert isinstance(spec, JobSpec)
            assert all(math.isfinite(x) for x in (spec.optimizer.lr, spec.data.test_fraction))

        _refused_cleanly(load)


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_as_a_job_file_is_refused_cleanly(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.yaml"
        path.write_text(text)
        _refused_cleanly(lambda: load_job(path))


@FUZZ
@given(url=st.one_of(st.text(max_size=80), st.builds(
    lambda scheme, user, pw, host, path, q: f"{scheme}://{user}:{pw}@{host}/{path}{q}",
    st.sampled_from(["s3", "S3", "http", "HTTPS", "gs", "file", "ftp"]),
    st.text(alphabet="abcdefghAKIA0123456789", min_size=1, max_size=12),
    st.text(alphabet="abc/+=@XYZ789secret", min_size=6, max_size=20), st.text(max_size=15),
    st.text(max_size=15), st.sampled_from(["", "?X-Amz-Signature=sigsecret", "?sig=zzsecretzz"]))))
def test_urls_are_judged_without_errors_and_secrets_never_shown(url):
    why = problem(url)
    assert why is None or isinstance(why, str)
    shown = redact(url)
    if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", url) and "@" in url.split("://", 1)[1].split("/")[0]:
        userinfo = url.split("://", 1)[1].split("/")[0].rsplit("@", 1)[0]
        assert f"://{userinfo}@" not in shown and "://***@" in shown, shown
    for secret in ("sigsecret", "zzsecretzz"):
        if secret in url.split("?", 1)[-1] and "?" in url:
            assert secret not in shown.split("?", 1)[-1]
    if why is not None:
        assert "secret" not in why or "***" in why or "@" not in url


# ---------------------------------------------------------------- data files


def _spec(arch, source, fmt):
    from gradyard.job import parse_job

    return parse_job({"name": "fuzz", "model": {"arch": arch}, "data": {"source": source, "format": fmt},
                      "schedule": {"epochs": 1}})


def _loads_or_refuses(spec) -> None:
    from gradyard.data import build_datasets

    try:
        train, test, info = build_datasets(spec)
    except JobError as exc:  # DataError and ModelError are JobErrors
        assert str(exc).startswith(("data.source", "model.")), str(exc)
        return
    assert len(train) > 0 and info.num_classes >= 1
    x, y = train[0]
    assert x is not None and y is not None


def _idx(ndim_magic: int, dims: list[int], payload: bytes) -> bytes:
    return struct.pack(">I", ndim_magic) + b"".join(struct.pack(">I", d & 0xFFFFFFFF) for d in dims) + payload


@FUZZ
@given(magic=st.sampled_from([0x0803, 0x0801, 0x0802, 0, 0xFFFFFFFF]),
       dims=st.lists(st.integers(0, 2 ** 32 - 1) | st.integers(0, 30), min_size=0, max_size=4),
       payload=st.binary(max_size=2000), gz=st.booleans(), corrupt_gz=st.booleans())
def test_idx_files_load_or_are_refused(magic, dims, payload, gz, corrupt_gz):
    from testkit.datafiles import make_mnist

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_mnist(root, gz=False, n_train=10, n_test=10)
        blob = _idx(magic, dims, payload)
        target = root / "train-images-idx3-ubyte"
        if gz:
            target.unlink()
            target = root / "train-images-idx3-ubyte.gz"
            blob = gzip.compress(blob)
            if corrupt_gz:
                blob = blob[: len(blob) // 2]
        target.write_bytes(blob)
        _loads_or_refuses(_spec("lenet5", str(root), "idx"))


csv_cells = st.one_of(st.sampled_from(["?", "", "nan", "NA", "inf", "-1", "0", "1", "2", "yes", "no", "1e400",
                                        "x", "3.5", "\"quoted,comma\""]), st.text(max_size=6))


@FUZZ
@given(header=st.lists(st.text(min_size=0, max_size=6), min_size=0, max_size=4),
       rows=st.lists(st.lists(csv_cells, min_size=0, max_size=5), max_size=25),
       raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_csv_files_load_or_are_refused(header, rows, raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.csv"
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text("\n".join(",".join(r) for r in [header, *rows]))
        _loads_or_refuses(_spec("mlp", str(path), "csv"))


@FUZZ
@given(rows=st.lists(st.lists(csv_cells, min_size=5, max_size=7), max_size=30))
def test_mammographic_files_load_or_are_refused(rows):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mammographic_masses.data"
        path.write_text("\n".join(",".join(r) for r in rows))
        _loads_or_refuses(_spec("mlp", str(path), "mammographic"))


@FUZZ
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=4), links=st.booleans(),
       texts=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_image_folders_and_review_folders_load_or_are_refused(blobs, links, texts):
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "food"
        for split in ("train", "test"):
            for cls in ("a", "b"):
                (root / split / cls).mkdir(parents=True)
                buf = io.BytesIO()
                Image.new("RGB", (9, 7), (10, 20, 30)).save(buf, format="PNG")
                (root / split / cls / "ok.png").write_bytes(buf.getvalue())
        for i, blob in enumerate(blobs):  # broken images among good ones: each is refused at load, by name
            (root / "train" / "a" / f"bad{i}.png").write_bytes(blob)
        if links:
            (root / "train" / "c").symlink_to(Path(d))
        spec = _spec("tinyvgg", str(root), "imagefolder")
        from gradyard.data import build_datasets

        try:
            train, _, _ = build_datasets(spec)
            for i in range(len(train)):
                train[i]
        except JobError as exc:
            assert str(exc).startswith("data.source")
        imdb = Path(d) / "aclImdb"
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                (imdb / split / label).mkdir(parents=True)
                for i, blob in enumerate(texts):
                    (imdb / split / label / f"{i}.txt").write_bytes(blob)
        _loads_or_refuses(_spec("lstm_sentiment", str(imdb), "aclimdb"))
