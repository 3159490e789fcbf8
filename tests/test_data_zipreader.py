"""The shared zip reader: nested zips, per-process handles, pickling; and the packed index."""

import io
import multiprocessing
import pickle
import zipfile

import pytest

from eomt.data.records import PackedRecords
from eomt.data.zipreader import FolderReader, ZipReader, open_store, require_file
from eomt.errors import DataError

FILES = {f"inner/{i:03d}.bin": bytes([i]) * (100 + i) for i in range(20)}


def _inner_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in FILES.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _outer_zip(path, compression: int):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", b"hello")
        z.writestr(zipfile.ZipInfo("annotations/nested.zip"), _inner_zip(), compress_type=compression)
    return path


def test_nested_stored_zip_is_read_in_place(tmp_path):
    outer = _outer_zip(tmp_path / "outer.zip", zipfile.ZIP_STORED)
    reader = ZipReader(outer, inner="annotations/nested.zip", cache_dir=tmp_path / "cache")
    assert sorted(reader.names()) == sorted(FILES)
    for name in ["inner/013.bin", "inner/002.bin", "inner/019.bin", "inner/000.bin"]:  # random order
        assert reader.read(name) == FILES[name]
    assert not (tmp_path / "cache").exists()  # nothing was copied out


def test_nested_compressed_zip_is_copied_out_once(tmp_path):
    outer = _outer_zip(tmp_path / "outer.zip", zipfile.ZIP_DEFLATED)
    cache = tmp_path / "cache"
    reader = ZipReader(outer, inner="annotations/nested.zip", cache_dir=cache)
    assert reader.read("inner/007.bin") == FILES["inner/007.bin"]
    copies = list(cache.iterdir())
    assert len(copies) == 1
    ZipReader(outer, inner="annotations/nested.zip", cache_dir=cache).read("inner/001.bin")
    assert list(cache.iterdir()) == copies


def test_missing_archive_and_member_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.zip"):
        ZipReader(tmp_path / "nowhere.zip")
    outer = _outer_zip(tmp_path / "outer.zip", zipfile.ZIP_STORED)
    with pytest.raises(FileNotFoundError, match="annotations/other.zip"):
        ZipReader(outer, inner="annotations/other.zip")
    with pytest.raises(FileNotFoundError, match=r"expected .*x\.zip \(get it from https://example\.org\)"):
        require_file(tmp_path / "x.zip", "X", "https://example.org")


def test_pickling_drops_the_handle_and_reopens(tmp_path):
    reader = ZipReader(_outer_zip(tmp_path / "outer.zip", zipfile.ZIP_STORED), inner="annotations/nested.zip")
    assert reader.read("inner/003.bin") == FILES["inner/003.bin"]
    state = pickle.dumps(reader)
    assert b"ZipFile" not in state
    clone = pickle.loads(state)
    assert clone._zip is None
    assert clone.read("inner/004.bin") == FILES["inner/004.bin"]


def _read_in_child(reader: ZipReader, name: str, queue) -> None:
    queue.put((reader.read(name), id(reader.zipfile)))


def test_forked_child_opens_its_own_handle(tmp_path):
    reader = ZipReader(_outer_zip(tmp_path / "outer.zip", zipfile.ZIP_STORED), inner="annotations/nested.zip")
    parent_handle = reader.zipfile
    reader.read("inner/005.bin")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(reader, "inner/011.bin", queue))
    child.start()
    data, _ = queue.get(timeout=30)
    child.join(timeout=30)
    assert data == FILES["inner/011.bin"]
    assert reader.zipfile is parent_handle  # the parent's handle is untouched and still works
    assert reader.read("inner/012.bin") == FILES["inner/012.bin"]


def test_folder_store_and_open_store(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"png")
    store = open_store(tmp_path / "a")
    assert isinstance(store, FolderReader)
    assert store.names() == ["b/x.png"]
    assert store.read("b/x.png") == b"png"
    assert isinstance(open_store(_outer_zip(tmp_path / "o.zip", zipfile.ZIP_STORED)), ZipReader)


def test_packed_records_round_trip():
    records = [{"image": f"{i}.jpg", "segments": [(i, 2, False)] * (i % 3)} for i in range(50)]
    packed = pickle.loads(pickle.dumps(PackedRecords(records)))
    assert len(packed) == 50
    assert [packed[i] for i in range(50)] == records
    assert packed[-1] == records[-1]
    with pytest.raises(IndexError):
        packed[50]


def test_a_truncated_zip_is_a_one_line_data_error_naming_it(tmp_path):
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "x" * 1000)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match=r"images\.zip is not a readable zip archive .*download it again"):
        ZipReader(path).names()
