"""Entries: what headers say about a tensor, in the order its bytes sit in the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ownership.formats import Entry, open_checkpoint


def test_entry_sizes() -> None:
    entry = Entry("w", "BF16", (4, 8), "model.safetensors")
    assert (entry.itemsize, entry.nbytes) == (2, 64)
    assert Entry("s", "F64", (), "m.bin").nbytes == 8
    assert Entry("e", "F8_E4M3", (3, 0), "m.bin").nbytes == 0
    with pytest.raises(AttributeError):
        entry.key = "v"  # type: ignore[misc]


def test_entries_follow_the_bytes_not_the_header(tmp_path: Path) -> None:
    # A valid file whose JSON header lists keys in another order than their data.
    header = {
        "z.first": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "a.third": {"dtype": "I8", "shape": [3], "data_offsets": [12, 15]},
        "m.second": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]},
    }
    text = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    data = torch.tensor([1.0, 2.0]).view(torch.uint8).tolist()
    data += [*torch.tensor([3.0, 4.0], dtype=torch.float16).view(torch.uint8).tolist(), 5, 6, 7]
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data))
    with open_checkpoint(path) as checkpoint:
        assert [e.key for e in checkpoint.entries()] == ["z.first", "m.second", "a.third"]
        assert checkpoint.read("m.second").tolist() == [3.0, 4.0]
        assert checkpoint.read("a.third", (((1, 3, 1),),)).tolist() == [6, 7]
