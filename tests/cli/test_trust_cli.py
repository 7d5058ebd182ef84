"""The command line's errors: each one exit 2 and one line on stderr naming the problem and the fix; configs
checked by their JSON schemas; teachers named uniquely; counts in the right number."""

from __future__ import annotations

import errno
import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from torch.utils.data import Dataset

import softtargets as st
from softtargets.cli import main
from softtargets.precompute.teachers import TeacherLoadError, fingerprint, load_teachers
from tests.cli.test_precompute_config import D, N, write_config
from tests.sharing import data_file, flip_byte, make_store, run_cli
from tests.store_data import write_packed
from tests.teacher_zoo import mlp

# ---------------------------------------------------------------------------------------------- helpers


def assert_one_line_error(rc: int, err: str, *words: str) -> str:
    """Exit 2, exactly one line on stderr, holding every one of ``words``; no traceback."""
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


class StringItems(Dataset):
    """A map-style dataset whose items are strings, not tensors."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> str:
        return f"image-{i}.jpg"


def string_items() -> Dataset:
    return StringItems()


class LateStringItem(Dataset):
    """Tensors, but item 5 is a string: found by a DataLoader worker, not by the first batch."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor | str:
        return "image-5.jpg" if i == 5 else torch.zeros(D)


def late_string_item() -> Dataset:
    return LateStringItem()


def packed_store(root: Path, n: int = 64, d: int = 8, c: int = 5) -> Path:
    """A wds store with inputs ``input.npy`` float32 ``[d]`` packed beside every row; 2 teachers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    logits = torch.randn(n, 2, c, generator=g)
    return write_packed(root / "packed.wds", x, logits, torch.arange(n) % c, shard_rows=32)


def train_config(root: Path, store: Path, in_features: int = 8, extra_data: str = "", extra_train: str = "") -> Path:
    config = root / "train.toml"
    config.write_text(f"""[student]
factory = "torch.nn:Linear"
kwargs = {{ in_features = {in_features}, out_features = 5 }}

[data]
store = "{store}"
{extra_data}
[loss]
temperature = 2.0

[train]
epochs = 1
batch_size = 16
out = "run"
{extra_train}""")
    return config


# ---------------------------------------------------------------------------------------------- teachers


def test_teachers_of_one_class_are_named_uniquely_by_default(tmp_path):
    torch.manual_seed(0)
    a, b = mlp(D, 4), mlp(D, 4)
    x = torch.randn(N, D)
    m = st.precompute([a, b], torch.utils.data.TensorDataset(x), tmp_path / "t.zarr", scheduler="local",
                      num_workers=0, dtype="float32", progress=False)
    assert [t["name"] for t in m.teachers] == ["Sequential-0", "Sequential-1"]
    assert [t["sha256"] for t in m.teachers] == [fingerprint(a), fingerprint(b)]
    assert m.teachers[0]["sha256"] != m.teachers[1]["sha256"]
    named = load_teachers([{"name": "Sequential-0", "module": a}, b, mlp(D, 4)])
    assert [t.name for t in named] == ["Sequential-0", "Sequential-1", "Sequential-2"]
    assert [t.name for t in load_teachers([a, {"name": "solo", "module": b}])] == ["Sequential", "solo"]
    with pytest.raises(ValueError, match=r"teacher names must be unique: 'x' at positions \[0, 2\]"):
        load_teachers([{"name": "x", "module": a}, b, {"name": "x", "module": mlp(D, 4)}])


# ---------------------------------------------------------------------------------------------- precompute errors


def test_factory_kwargs_error_names_the_teacher(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    edit(config, "num_classes = 4 }\nweights = \"t1.pt\"", "num_classes = 4, depth = 3 }\nweights = \"t1.pt\"")
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "teacher 't1'", "tests.teacher_zoo:mlp", "depth", "kwargs")
    assert not (tmp_path / "out.zarr").exists()


def test_missing_weights_file_names_the_teacher(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    (tmp_path / "t1.pt").unlink()
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "teacher 't1'", str(tmp_path / "t1.pt"), "not found", "weights")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    config, _, _ = write_config(tmp_path, extra_top='device = "cuda"')
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "device 'cuda'", "not available", '"cpu"')
    assert not (tmp_path / "out.zarr").exists()


def test_non_tensor_dataset_item_is_one_line(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    edit(config, 'webdataset = "inputs-{000..000}.tar"', 'factory = "tests.cli.test_trust_cli:string_items"')
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    line = assert_one_line_error(rc, err, "item 0 (key '0') of StringItems", "str", "tensor")
    assert line.startswith("softtargets precompute: error: ")


def test_non_tensor_item_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    edit(config, 'webdataset = "inputs-{000..000}.tar"', 'factory = "tests.cli.test_trust_cli:late_string_item"')
    edit(config, "num_workers = 0", "num_workers = 1")
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    line = assert_one_line_error(rc, err, "item 5 (key '5') of LateStringItem", "got str")
    assert "DataLoader worker" not in line and "Original Traceback" not in line


class FullMemoryFileSystem(MemoryFileSystem):
    """``fullmem://``: a memory filesystem whose tar files hit ENOSPC, as on a full disk."""

    protocol = ("fullmem",)

    def pipe_file(self, path, value, *args, **kwargs):
        if str(path).endswith(".tar"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().pipe_file(path, value, *args, **kwargs)

    def open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tar"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().open(path, mode, *args, **kwargs)


def test_enospc_on_the_wds_writer_names_the_path(tmp_path, capsys):
    fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)
    config, _, _ = write_config(tmp_path)
    edit(config, 'url = "out.zarr"', 'url = "fullmem://full/out.wds"\nlayout = "wds"')
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "No space left on device", "/full/out.wds/shard-00000")


BUCKET = "trust-cli-no-credentials"


def test_s3_without_credentials_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    s3fs = pytest.importorskip("s3fs", reason="s3:// needs the optional extra s3fs")
    moto_server = pytest.importorskip("moto.server", reason="the s3 test needs moto[server]")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        admin = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                                  skip_instance_cache=True)
        admin.mkdir(BUCKET)  # moto's buckets outlive its server in this process: a name of this test's own
        config, _, _ = write_config(tmp_path)
        edit(config, 'url = "out.zarr"', f'url = "s3://{BUCKET}/out.zarr"')
        rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
        assert_one_line_error(rc, err, "credentials", "AWS_ACCESS_KEY_ID")
        assert "botocore" not in err
        admin.invalidate_cache()
        assert admin.find(BUCKET) == []  # no half-made store
        admin.rmdir(BUCKET)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


# ---------------------------------------------------------------------------------------------- config schemas


@pytest.mark.parametrize(("old", "new", "words"), [
    ("batch_size = 16", 'batch_size = "64"', ("batch_size = '64'", "must be an integer, not a string")),
    ("batch_size = 16", "batch_size = 16\nbatchsize = 3\nworkers = 2",
     ("2 unknown keys in the top level: 'batchsize', 'workers'", "allowed: ", "batch_size")),
    ("shard_rows = 16", "shard_rows = 0", ("[output] shard_rows = 0", "must be >= 1")),
    ('content = "geometric"', 'content = "mean"', ("[output] content = 'mean'", "'per_teacher'")),
    ('weights = "t1.pt"', 'weights = "t1.pt"\nwieghts = 1', ("1 unknown key in teachers[1]: 'wieghts'",)),
    ('scheduler = "local"', "scheduler = 7", ("[cluster] scheduler = 7", "must be a string, not an integer")),
])
def test_precompute_config_is_checked_by_its_schema(tmp_path, capsys, old, new, words):
    config, _, _ = write_config(tmp_path)
    edit(config, old, new)
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, str(config), *words)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(("old", "new", "words"), [
    ("batch_size = 16", 'batch_size = "64"', ("[train] batch_size = '64'", "must be an integer, not a string")),
    ("batch_size = 16", "batch_size = 16\nshuffle = true",
     ("1 unknown key in [train]: 'shuffle'", "allowed: ", "checkpoint_every")),
    ("epochs = 1", "epochs = 0", ("[train] epochs = 0", "must be >= 1")),
    ("temperature = 2.0", "temperature = { start = 4.0, stop = 1.0 }",
     ("[loss] temperature", "must be a number or a string or a table")),
])
def test_train_config_is_checked_by_its_schema(tmp_path, capsys, old, new, words):
    config = edit(train_config(tmp_path, tmp_path / "none.wds"), old, new)
    rc, _, err = run_cli(["train", config], capsys)
    assert_one_line_error(rc, err, str(config), *words)


def test_config_schemas_are_valid_and_shipped():
    import jsonschema

    from softtargets.cli.config import config_schema

    for name in ("precompute-config", "train-config"):
        schema = config_schema(name)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"schemas" = "softtargets/schemas"' in text


# ---------------------------------------------------------------------------------------------- resume, hints


def test_resume_on_a_finished_store_is_a_no_op(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    assert run_cli(["precompute", config, "--quiet"], capsys)[0] == 0
    out = tmp_path / "out.zarr"
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    (out / ".softtargets-shards").mkdir()
    (out / ".softtargets-shards" / "000000.json").write_text("{}")
    rc, stdout, err = run_cli(["precompute", config, "--quiet", "--resume"], capsys)
    assert rc == 0 and err == ""
    assert "already complete" in stdout and "nothing to resume" in stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # leftover run markers removed
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    line = assert_one_line_error(rc, err, "exists", "--resume or --overwrite")
    assert "resume=True" in line  # the library's words, then the command line's


def test_refusals_of_existing_stores_name_the_flags_not_given(tmp_path, capsys):
    store = make_store(tmp_path, "wds", "s", n=32, shard_rows=32)
    assert run_cli(["convert", store, tmp_path / "c.zarr", "--no-progress"], capsys)[0] == 0
    for argv in (["convert", store, tmp_path / "c.zarr"], ["subset", store, tmp_path / "c.zarr", "--range", "0:4"]):
        rc, _, err = run_cli([*argv, "--no-progress"], capsys)
        assert_one_line_error(rc, err, "is a finished store", "(command line: --overwrite)")
    rc, _, err = run_cli(["subset", store, tmp_path / "c.zarr", "--range", "0:4", "--overwrite", "--no-progress"],
                         capsys)
    assert rc == 0, err


def test_summaries_count_in_the_right_number(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    edit(config, "shard_rows = 16", "shard_rows = 64")
    rc, stdout, _ = run_cli(["precompute", config, "--quiet"], capsys)
    assert rc == 0 and f"precompute: {N} samples in 1 shard," in stdout
    store = make_store(tmp_path, "wds", "s", n=32, shard_rows=32)
    rc, stdout, _ = run_cli(["convert", store, tmp_path / "c.zarr", "--no-progress"], capsys)
    assert rc == 0 and "1 shard," in stdout and "1 shards" not in stdout
    flip_byte(data_file(store, 0))
    rc, stdout, err = run_cli(["verify", store, "--no-progress", "--json"], capsys)
    assert rc == 1 and err.strip() == "softtargets verify: 1 problem in 1 file"


# ---------------------------------------------------------------------------------------------- train errors


def test_missing_input_key_lists_the_batch_keys(tmp_path, capsys):
    store = packed_store(tmp_path)
    config = train_config(tmp_path, store, extra_data='input_key = "image"')
    rc, _, err = run_cli(["train", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "'image'", "'input'", "'teacher_logits'", "input_key")


def test_student_input_shape_mismatch_is_one_line(tmp_path, capsys):
    store = packed_store(tmp_path)
    config = train_config(tmp_path, store, in_features=3)
    rc, _, err = run_cli(["train", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "student", "[16, 8]", "shape")


# ---------------------------------------------------------------------------------------------- http, debug


class _NoRangeHandler(SimpleHTTPRequestHandler):
    """Python's file server as it is: it ignores Range and sends whole files."""

    def log_message(self, *args) -> None:
        pass


def test_http_server_ignoring_range_is_named(tmp_path, capsys):
    make_store(tmp_path, "zarr", "good")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_NoRangeHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/good.zarr"
        rc, _, err = run_cli(["inspect", url, "--no-progress"], capsys)
    finally:
        server.shutdown()
        server.server_close()
    line = assert_one_line_error(rc, err, "ignores Range requests", url)
    assert "checksum" not in line


def test_debug_raises_with_the_traceback(tmp_path, capsys, monkeypatch):
    config, _, _ = write_config(tmp_path)
    (tmp_path / "t0.pt").unlink()
    with pytest.raises(TeacherLoadError, match="teacher 't0'"):
        main(["--debug", "precompute", str(config), "--quiet"])
    with pytest.raises(TeacherLoadError):
        main(["precompute", str(config), "--quiet", "--debug"])
    monkeypatch.setenv("SOFTTARGETS_DEBUG", "1")
    with pytest.raises(TeacherLoadError):
        main(["precompute", str(config), "--quiet"])
    monkeypatch.setenv("SOFTTARGETS_DEBUG", "0")
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "teacher 't0'")


def test_errors_from_user_code_are_one_line(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    edit(config, 'webdataset = "inputs-{000..000}.tar"', 'factory = "tests.cli.test_trust_cli:keyerror_dataset"')
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "KeyError", "'split'")
    edit(config, 'factory = "tests.cli.test_trust_cli:keyerror_dataset"', 'factory = "tests.cli.test_trust_cli:broken"')
    rc, _, err = run_cli(["precompute", config, "--quiet"], capsys)
    assert_one_line_error(rc, err, "ZeroDivisionError", "--debug")


def keyerror_dataset() -> Dataset:
    return {"train": np.zeros(3)}["split"]


def broken() -> Dataset:
    return 1 / 0
