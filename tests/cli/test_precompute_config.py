"""The precompute config (TOML) and CLI: paths, refusals, and a run on WebDataset inputs."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from softtargets.cli import main
from softtargets.cli.commands.precompute import load_config
from softtargets.math.temperature import zero_mean
from softtargets.store import open_targets
from tests.teacher_zoo import mlp

D, C, N = 6, 4, 40


def write_inputs(path, n: int = N) -> torch.Tensor:
    """A WebDataset tar of ``n`` samples: ``input.npy`` float32 [D] and ``cls``; keys ``img-000``..."""
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(3))
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, x[i].numpy())
            sink.write({"__key__": f"img-{i:03d}", "input.npy": buf.getvalue(), "cls": str(i % C).encode()})
    return x


def write_config(tmp_path, extra_top: str = "", extra_output: str = "") -> tuple:
    """Two teachers with saved weights, inputs in a tar, a config using relative paths to both."""
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(mlp(D, C).eval())
        torch.save(models[-1].state_dict(), tmp_path / f"t{k}.pt")
    x = write_inputs(tmp_path / "inputs-000.tar")
    teachers = "".join(f'[[teachers]]\nname = "t{k}"\nfactory = "tests.teacher_zoo:mlp"\n'
                       f'kwargs = {{ in_features = {D}, num_classes = {C} }}\nweights = "t{k}.pt"\n\n'
                       for k in range(2))
    config = tmp_path / "run.toml"
    config.write_text(f"""batch_size = 16
num_workers = 0
autocast = "none"
{extra_top}
[output]
url = "out.zarr"
content = "geometric"
dtype = "float32"
shard_rows = 16
{extra_output}
[transfer_set]
webdataset = "inputs-{{000..000}}.tar"

[cluster]
scheduler = "local"

{teachers}""")
    return config, models, x


def test_load_config_resolves_paths_next_to_the_config(tmp_path):
    config, _, _ = write_config(tmp_path)
    kw = load_config(config)
    assert kw["out"] == str(tmp_path / "out.zarr")
    assert kw["dataset"] == {"webdataset": str(tmp_path / "inputs-{000..000}.tar")}
    assert [t["weights"] for t in kw["teachers"]] == [str(tmp_path / "t0.pt"), str(tmp_path / "t1.pt")]
    assert kw["autocast"] is None and kw["scheduler"] == "local" and kw["shard_rows"] == 16
    assert str(tmp_path) in sys.path


@pytest.mark.parametrize(("edit", "message"), [
    ('batch_sise = 3\n', r"1 unknown key in the top level: 'batch_sise'"),
    ('[output]\nurl = "o.zarr"\nformat = "x"\n', r"1 unknown key in \[output\]: 'format'"),
    ('[output]\ncontent = "geometric"\n', r"\[output\] needs url"),
    ('[output]\nurl = "o.zarr"\n', r"no \[\[teachers\]\]"),
])
def test_bad_configs_name_the_file_and_the_key(tmp_path, edit, message):
    config = tmp_path / "bad.toml"
    config.write_text(edit + '[transfer_set]\nfactory = "x:y"\n' + ("" if "[output]" in edit else
                                                                     '[output]\nurl = "o.zarr"\n'))
    with pytest.raises(ValueError, match=message) as info:
        load_config(config)
    assert str(config) in str(info.value)


def test_cli_runs_on_webdataset_inputs_and_refuses_to_overwrite(tmp_path, capsys):
    config, models, x = write_config(tmp_path)
    assert main(["precompute", str(config), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert f"precompute: {N} samples in 3 shards" in summary and "geometric logits 40x4 float32" in summary
    store = open_targets(tmp_path / "out.zarr", verify="full")
    rows = store[:]
    assert rows["key"] == [f"img-{i:03d}" for i in range(N)]
    assert rows["label"].tolist() == [i % C for i in range(N)]
    with torch.inference_mode():
        want = zero_mean(torch.stack([m(x) for m in models], dim=1).mean(dim=1))
    torch.testing.assert_close(rows["logits"], want, rtol=0, atol=1e-6)
    assert store.manifest.transfer_set["name"] == "WebDatasetSource"

    assert main(["precompute", str(config), "--quiet"]) == 2
    assert "--resume or --overwrite" in capsys.readouterr().err
    assert main(["precompute", str(config), "--quiet", "--overwrite"]) == 0
