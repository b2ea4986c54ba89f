"""Every Python example in the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


# Lightning 2.6 warns on every fit under torch 2.13 (torch's pytree LeafSpec), when a resumed run finds its
# checkpoint folder, and about DataLoader workers on machines with more cores; none is the example's doing.
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")
@pytest.mark.filterwarnings(r"ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings(r"ignore:Checkpoint directory .* exists and is not empty:UserWarning")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Any, monkeypatch: Any, capsys: Any, request: Any) -> None:
    monkeypatch.chdir(tmp_path)
    if "s3://my-bucket" in BLOCKS[index]:  # the object-store example: a local S3 server with that bucket
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        client = boto3.client("s3", endpoint_url=endpoint)
        if "my-bucket" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket="my-bucket")
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    for expected in re.findall(r"print\(.*?\)\s+# -> (.+)", BLOCKS[index]):  # "# -> X": X is printed
        assert expected.strip() in out
