"""Export onto a folder: a folder (or anything but a file) at a target's name is refused with the reason, exit 3,
and left alone, with or without --overwrite; every other file is written."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from cachebuild.cli import cli
from cachebuild.consumers.export.kohya import kohya_npz_name
from cachebuild.consumers.reader import open_cache
from tests.test_export import dataset, sdxl  # noqa: F401  (fixtures: a built sdxl cache, a copy of its dataset)


def test_a_folder_at_a_kohya_target_is_refused_and_the_rest_written(sdxl, dataset):  # noqa: F811
    cache = sdxl[1]
    reader = open_cache(cache)
    paths, key = reader.source_paths(), reader.keys()[0]
    target = dataset / kohya_npz_name(paths[key], tuple(reader.info(key)["original_size"]), "sdxl")
    target.mkdir()
    (target / "kept.txt").write_text("a user's file")
    args = ["export", str(cache), "--to", str(dataset)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["blocked"] == [
        {"path": target.name, "reason": "a folder is in the way of this file; move or rename it, then export again"}
    ]
    assert summary["written"] == len(reader) - 2  # every item but this one and the EXIF-rotated one
    again = CliRunner().invoke(cli, [*args, "--overwrite"])  # what a person reads; --overwrite replaces files only
    assert again.exit_code == 3 and "Traceback" not in again.output, again.output
    assert f"refused {target.name}: a folder is in the way" in again.output
    assert (target / "kept.txt").read_text() == "a user's file"


def test_a_folder_at_a_webdataset_shard_name_is_refused(sdxl, tmp_path):  # noqa: F811
    to = tmp_path / "shards"
    os.makedirs(to / "shard-000000.tar")
    result = CliRunner().invoke(cli, ["export", str(sdxl[1]), "--to", str(to), "--format", "webdataset", "--json"])
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert [b["path"] for b in summary["blocked"]] == ["shard-000000.tar"] and summary["written"] == 1  # the index
