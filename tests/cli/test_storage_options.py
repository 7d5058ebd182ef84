"""``--storage-option KEY=VALUE`` and ``[storage]``: parsed, nested, merged, and taken by every command with a URL."""

from __future__ import annotations

import pytest

from softtargets.cli import build_parser
from softtargets.cli.commands.precompute import load_config
from softtargets.cli.storage import merge_options, parse_storage_option, storage_options


def test_values_parse_as_json_else_strings_and_dotted_keys_nest():
    assert parse_storage_option("anon=true") == {"anon": True}
    assert parse_storage_option("key=AKIA=x") == {"key": "AKIA=x"}
    assert parse_storage_option("client_kwargs.endpoint_url=http://127.0.0.1:9000") == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert parse_storage_option("config_kwargs.retries.max_attempts=2") == {
        "config_kwargs": {"retries": {"max_attempts": 2}}}
    for bad in ("novalue", "=x", "a..b=1"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_storage_option(bad)


def test_command_line_options_merge_into_the_config_table_and_win():
    base = {"client_kwargs": {"endpoint_url": "http://a", "region_name": "eu"}, "key": "k"}
    assert merge_options(base, {"client_kwargs": {"endpoint_url": "http://b"}}) == {
        "client_kwargs": {"endpoint_url": "http://b", "region_name": "eu"}, "key": "k"}
    args = build_parser().parse_args(["verify", "s3://b/t.zarr", "--storage-option", "secret=s",
                                      "--storage-option", "client_kwargs.endpoint_url=http://c"])
    assert storage_options(args, base) == {"client_kwargs": {"endpoint_url": "http://c", "region_name": "eu"},
                                           "key": "k", "secret": "s"}
    assert storage_options(build_parser().parse_args(["inspect", "t.zarr"])) is None


@pytest.mark.parametrize("argv", [["precompute", "c.toml"], ["train", "c.toml"], ["inspect", "u"], ["verify", "u"],
                                  ["convert", "a", "b"], ["merge", "a", "b", "c"],
                                  ["subset", "a", "b", "--range", ":"]])
def test_every_command_that_takes_a_url_takes_storage_options(argv):
    args = build_parser().parse_args([*argv, "--storage-option", "anon=false"])
    assert storage_options(args) == {"anon": False}


def test_the_precompute_config_storage_table_becomes_storage_options(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[output]\nurl = "s3://b/t.zarr"\n[transfer_set]\nfactory = "m:f"\n'
                      '[storage]\nkey = "k"\nclient_kwargs = { endpoint_url = "http://127.0.0.1:1" }\n'
                      '[cluster]\nship_weights = true\n[[teachers]]\nfactory = "m:t"\n')
    kwargs = load_config(config)
    assert kwargs["storage_options"] == {"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    assert kwargs["ship_weights"] is True and kwargs["out"] == "s3://b/t.zarr"
