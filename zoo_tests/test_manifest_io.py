"""manifest.json, the commit point of both saved formats, is replaced whole or not at all."""

import json

import pytest

from nxd_core import trace_format
from nxd_core.manifest_io import MANIFEST, write_json_atomically


def test_a_failed_traced_manifest_write_keeps_the_old_one_and_leaves_no_temporary(tmp_path):
    trace_format.write_manifest(tmp_path, {"format": "old"})
    with pytest.raises(TypeError):
        trace_format.write_manifest(tmp_path, {"format": "new", "unserializable": object()})
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"format": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]


def test_the_manifest_is_replaced_by_rename_through_the_named_temporary(tmp_path):
    target, tmp = tmp_path / MANIFEST, tmp_path / "save-1.tmp"
    target.write_text("{}")
    old_inode = target.stat().st_ino
    write_json_atomically(target, {"tp": 2}, tmp=tmp)
    assert json.loads(target.read_text()) == {"tp": 2}
    assert not tmp.exists() and target.stat().st_ino != old_inode  # a new file renamed over the old one
