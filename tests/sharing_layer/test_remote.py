"""Stores read where the reader may not write: over http:// (loopback, Range), s3:// (a local moto server,
skipped when moto or s3fs is absent) and from a read-only directory."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

import softtargets as st
from softtargets.sharing.inspect import inspect_store
from softtargets.sharing.verify import verify_store

from ..http_server import serve_directory
from ..sharing import all_rows, assert_same_rows, data_file, flip_byte, make_store, tree_state
from ..store_data import LAYOUTS


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both layouts, plus a copy of each with one flipped byte and one missing shard, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    for layout in LAYOUTS:
        good = make_store(root, layout, "good")
        bad = root / f"bad.{layout}"
        shutil.copytree(good, bad)
        flip_byte(data_file(bad, 1))
        data_file(bad, 3).unlink()
    with serve_directory(root) as base:
        yield root, base


@pytest.mark.parametrize("layout", LAYOUTS)
def test_http_open_inspect_verify(served, layout):
    root, base = served
    url = f"{base}/good.{layout}"
    remote, local = st.open_targets(url), st.open_targets(root / f"good.{layout}")
    assert_same_rows(all_rows(remote), all_rows(local))
    assert remote.take([149, 0, 77])["key"] == ["img/000149.jpg", "img/000000.jpg", "img/000077.jpg"]
    local_stats = inspect_store(root / f"good.{layout}", progress=False)["stats"]
    assert inspect_store(url, progress=False)["stats"] == local_stats
    report = verify_store(url, progress=False)
    assert report.ok, report.problems
    assert report.rows_checked == 150


@pytest.mark.parametrize("layout", LAYOUTS)
def test_http_verify_names_bad_files(served, layout):
    root, base = served
    url = f"{base}/bad.{layout}"
    report = verify_store(url, progress=False)
    flipped = f"{url}/{data_file(root / f'bad.{layout}', 1).relative_to(root / f'bad.{layout}')}"
    missing = f"{url}/{data_file(root / f'bad.{layout}', 3).relative_to(root / f'bad.{layout}')}"
    assert sorted(report.bad_files) == sorted([flipped, missing])
    messages = {p.path: p.message for p in report.problems}
    assert "sha256" in messages[flipped] and "missing" in messages[missing]
    store = st.open_targets(url)  # sizes cannot be listed over http: the reads refuse instead
    with pytest.raises(st.ChecksumError, match=flipped):
        store.rows(32, 64)
    with pytest.raises(st.StoreError, match=missing):
        store.rows(96, 128)


# -- s3:// through s3fs, against moto's server on the loopback ----------------------------------------------


@pytest.fixture(scope="module")
def s3(served):
    pytest.importorskip("s3fs", reason="s3:// needs the optional extra s3fs")
    moto_server = pytest.importorskip("moto.server", reason="the s3 test needs moto[server]")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.mkdir("targets")
        root, _ = served
        for name in ("good.zarr", "good.wds", "bad.wds"):
            fs.put(str(root / name), f"targets/{name}", recursive=True)
        yield root
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("layout", LAYOUTS)
def test_s3_open_inspect_verify(s3, layout):
    url = f"s3://targets/good.{layout}"
    assert_same_rows(all_rows(st.open_targets(url)), all_rows(st.open_targets(s3 / f"good.{layout}")))
    assert inspect_store(url, stats=False)["bytes"] == inspect_store(s3 / f"good.{layout}", stats=False)["bytes"]
    assert verify_store(url, progress=False).ok


def test_s3_verify_names_bad_files(s3):
    report = verify_store("s3://targets/bad.wds", progress=False)
    assert sorted(report.bad_files) == ["s3://targets/bad.wds/shard-000001.tar", "s3://targets/bad.wds/shard-000003.tar"]


# -- a read-only directory --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_only_directory(tmp_path, layout):
    """Open, read every row, inspect and verify a store in a directory without write permission.

    chmod does not stop root, so the test also compares every file's size, mtime and mode before
    and after: reading must write nothing, whoever runs it.
    """
    path = make_store(tmp_path, layout)
    expected = all_rows(st.open_targets(path))
    modes = {}
    for p in [path, *path.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = tree_state(path)
    try:
        store = st.open_targets(path, verify="full")
        assert_same_rows(all_rows(store), expected)
        assert store["img/000042.jpg"]["index"] == 42
        assert inspect_store(path, progress=False)["stats"]["rows"] == 150
        assert verify_store(path, progress=False).ok
        assert tree_state(path) == before
    finally:
        for p, mode in sorted(modes.items(), key=lambda kv: len(kv[0].parts)):
            p.chmod(mode)
