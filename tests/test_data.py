"""Dataset loading: IDX parsing, checksums, truncation, search order, download path.

Downloads are served by a local HTTP server on 127.0.0.1 from files the test writes."""

import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from bnlab.lab import data as D


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def make_spec(tmp: Path, name: str = "tiny", n_train: int = 12, n_test: int = 5):
    """Write a tiny MNIST-shaped dataset as .gz IDX files; returns (spec, folder, arrays)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
              rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
              rng.integers(0, 10, n_test, dtype=np.uint8)]
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    folder = tmp / "served"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for arr, fname in zip(arrays, names):
        raw = idx_bytes(arr)
        gz = gzip.compress(raw, mtime=0)
        (folder / f"{fname}.gz").write_bytes(gz)
        files.append(D.IdxFile(fname, hashlib.sha256(gz).hexdigest(), hashlib.sha256(raw).hexdigest()))
    spec = D.IdxSpec(name, ("http://127.0.0.1:9/unused/",), tuple(files), tuple("0123456789"))
    return spec, folder, arrays


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNLAB_DATA", raising=False)


def test_parse_idx_round_trip_and_dtypes():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(D.parse_idx(idx_bytes(a)), a)
    b = np.array([-5, 7, 1 << 20], dtype=np.int32)
    np.testing.assert_array_equal(D.parse_idx(idx_bytes(b)), b)


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:-3], r"header promises shape \(2, 3, 4\) \(24 bytes of data\) but the file holds 21"),
    (lambda b: b + b"\0", r"but the file holds 25"),
    (lambda b: b"\x01" + b[1:], r"not an IDX file"),
    (lambda b: b[:2] + b"\x07" + b[3:], r"unknown IDX data type 0x07"),
    (lambda b: b[:6], r"truncated IDX header"),
])
def test_parse_idx_rejects_bad_bytes(mutate, msg):
    good = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(D.DataError, match=msg):
        D.parse_idx(mutate(good), "x.idx")


def test_load_from_data_dir_gz_and_raw(tmp_path):
    spec, folder, arrays = make_spec(tmp_path)
    ds = D.load_idx_dataset(spec, folder, allow_download=False)
    assert ds.train_x.shape == (12, 16) and ds.train_x.dtype == np.float32
    np.testing.assert_allclose(ds.train_x, arrays[0].reshape(12, -1) / 255.0)
    np.testing.assert_array_equal(ds.test_y, arrays[3])
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    for f in spec.files:  # uncompressed copies are accepted and checked the same way
        (raw_dir / f.name).write_bytes(gzip.decompress((folder / f"{f.name}.gz").read_bytes()))
    np.testing.assert_array_equal(D.load_idx_dataset(spec, raw_dir, allow_download=False).train_y,
                                  arrays[1])


def test_bnlab_data_env_is_searched(tmp_path, monkeypatch):
    spec, folder, _ = make_spec(tmp_path)
    monkeypatch.setenv("BNLAB_DATA", str(folder))
    assert D.find_idx_dir(spec) == folder


def test_checksum_mismatch_names_the_file(tmp_path):
    spec, folder, arrays = make_spec(tmp_path)
    path = folder / "train-labels-idx1-ubyte.gz"
    arrays[1][0] = (arrays[1][0] + 1) % 10  # same size, different content
    path.write_bytes(gzip.compress(idx_bytes(arrays[1])))
    with pytest.raises(D.DataError, match=r"train-labels-idx1-ubyte.gz: SHA-256 of its contents is"):
        D.load_idx_dataset(spec, folder, allow_download=False)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    spec, folder, _ = make_spec(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte.gz: cannot be read .*truncated or corrupt"):
        D.load_idx_dataset(spec, folder, allow_download=False)


def test_image_label_count_mismatch(tmp_path):
    spec, folder, arrays = make_spec(tmp_path)
    raw = idx_bytes(arrays[1][:-1])
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    files = list(spec.files)
    files[1] = D.IdxFile(files[1].name, "", hashlib.sha256(raw).hexdigest())
    spec = D.IdxSpec(spec.name, spec.urls, tuple(files), spec.classes)
    with pytest.raises(D.DataError, match=r"train set has 12 images but 11 labels"):
        D.load_idx_dataset(spec, folder, allow_download=False)


def test_missing_files_message_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "system")
    spec, _, _ = make_spec(tmp_path, name="fashion-mnist")
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("BNLAB_DATA", str(nowhere))  # default search: no data_dir given
    with pytest.raises(D.DataError) as info:
        D.load_idx_dataset(spec, None, allow_download=False)
    msg = str(info.value)
    assert msg.startswith(f"fashion-mnist not found in {nowhere} or ") and "\n" not in msg
    assert str(tmp_path / "system" / "fashion-mnist") in msg and str(tmp_path / "cache" / "bnlab") in msg
    assert msg.endswith("get it with: bnlab download fashion-mnist, or pass --data-dir FOLDER "
                        "with its four IDX files")


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/served over HTTP on 127.0.0.1; yields the base URL."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_caches(tmp_path, server):
    spec, _, arrays = make_spec(tmp_path)
    spec = D.IdxSpec(spec.name, ("http://127.0.0.1:9/refused/", server), spec.files, spec.classes)
    ds = D.load_idx_dataset(spec, None, allow_download=True)  # first URL fails, second serves
    np.testing.assert_array_equal(ds.train_y, arrays[1])
    cached = tmp_path / "cache" / "bnlab" / "tiny"
    assert sorted(p.name for p in cached.iterdir()) == sorted(f"{f.name}.gz" for f in spec.files)
    assert D.find_idx_dir(spec) == cached  # next time no download is needed


def test_download_with_bad_checksum_leaves_nothing(tmp_path, server):
    spec, folder, _ = make_spec(tmp_path)
    bad = [D.IdxFile(f.name, "0" * 64, f.sha256) for f in spec.files]
    spec = D.IdxSpec(spec.name, (server,), tuple(bad), spec.classes)
    with pytest.raises(D.DataError, match=r"^tiny not found in [^\n]*, and downloading it failed "
                       r"\(127\.0\.0\.1:\d+: downloaded file has SHA-256 [^\n]*\); once online, "
                       r"get it with: bnlab download tiny, or pass --data-dir FOLDER[^\n]*$"):
        D.load_idx_dataset(spec, None, allow_download=True)
    assert not (tmp_path / "cache").exists()  # the folders the download created are gone


# -- an explicit data_dir is used or refused, never silently replaced ----------------------
@pytest.fixture
def fallbacks(tmp_path, monkeypatch, server):
    """A complete dataset reachable every other way: $BNLAB_DATA, the system folder and a
    download server; an explicit data_dir must use none of them."""
    spec, folder, _ = make_spec(tmp_path)
    spec = D.IdxSpec(spec.name, (server,), spec.files, spec.classes)
    monkeypatch.setenv("BNLAB_DATA", str(folder))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", folder.parent)
    monkeypatch.setitem(D.IDX_SPECS, "tiny", spec)
    return spec, folder


def assert_refused(spec, data_dir, problem):
    with pytest.raises(D.DataError) as info:
        D.load_idx_dataset(spec, data_dir, allow_download=True)
    msg = str(info.value)
    assert msg.startswith(f"tiny data folder {data_dir} {problem}"), msg
    assert "Pass a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in msg
    assert "or omit --data-dir to use the default search" in msg
    return msg


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path, fallbacks):
    spec, _ = fallbacks
    assert_refused(spec, tmp_path / "nowhere", "does not exist.")
    assert not (tmp_path / "cache").exists()  # nothing downloaded


def test_incomplete_data_dir_names_the_missing_files(tmp_path, fallbacks):
    spec, folder = fallbacks
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (partial / name).write_bytes((folder / name).read_bytes())
    msg = assert_refused(spec, partial, "lacks train-labels-idx1-ubyte.gz, t10k-labels-idx1-ubyte.gz "
                                        f"(looked in it and in {partial / 'tiny'})")
    assert "lacks train-images" not in msg


def test_data_dir_that_is_a_file_is_an_error(tmp_path, fallbacks):
    spec, folder = fallbacks
    assert_refused(spec, folder / "train-images-idx3-ubyte.gz", "is a file, not a folder.")


def test_complete_data_dir_or_its_subfolder_is_used(tmp_path, fallbacks):
    spec, folder = fallbacks
    sub = tmp_path / "mine" / "tiny"
    sub.mkdir(parents=True)
    for f in spec.files:  # raw, so they cannot be mistaken for $BNLAB_DATA's .gz files
        (sub / f.name).write_bytes(gzip.decompress((folder / f"{f.name}.gz").read_bytes()))
    assert D.load_idx_dataset(spec, sub.parent).train_x.shape == (12, 16)


def test_corrupt_deflate_stream_is_a_data_error(tmp_path):
    spec, folder, _ = make_spec(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[20:40] = b"\xff" * 20  # zlib.error, not an OSError, inside gzip (or a garbled header)
    path.write_bytes(bytes(data))
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte.gz: .*corrupt.*delete it"):
        D.load_idx_dataset(spec, folder, allow_download=False)


# -- a .gz is read only as far as its IDX header says it goes ------------------------------
def gzip_stream(*parts: bytes, zeros: int = 0) -> bytes:
    """A .gz of ``parts`` then ``zeros`` zero bytes, compressed chunk by chunk (small in memory)."""
    import zlib
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    out = [z.compress(p) for p in parts]
    chunk = bytes(1 << 16)
    for _ in range(zeros // len(chunk)):
        out.append(z.compress(chunk))
    return b"".join(out) + z.flush()


def test_gzip_bomb_is_refused_without_being_read_whole(tmp_path):
    import tracemalloc
    head = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2)  # a 2-byte IDX vector ...
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    bomb.write_bytes(gzip_stream(head, b"\1\2", zeros=64 << 20))  # ... then 64 MiB more
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(D.DataError, match=rf"^{bomb}: header promises shape \(2,\) \(2 bytes "
                           r"of data\) but the file holds more once decompressed; .*delete it"):
            D.read_idx(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # never the 64 MiB the file decompresses to


def test_gzip_whose_header_promises_more_than_deflate_can_hold(tmp_path):
    head = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 60000, 28, 28)
    small = tmp_path / "train-images-idx3-ubyte.gz"
    small.write_bytes(gzip_stream(head, bytes(100)))
    with pytest.raises(D.DataError, match=rf"^{small}: header promises shape \(60000, 28, 28\) "
                       r"\(47040000 bytes of data\) but the file holds at most \d+ \(deflate"):
        D.read_idx(small)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_file_shorter_than_its_header_says(tmp_path, suffix):
    raw = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))[:-5]
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(D.DataError, match=rf"^{path}: header promises shape \(2, 3, 4\) \(24 "
                       r"bytes of data\) but the file holds 19;"):
        D.read_idx(path)


def test_raw_idx_file_longer_than_its_header_says(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\0")
    with pytest.raises(D.DataError, match=r"but the file holds more;"):
        D.read_idx(path)


# -- download: keep re-compressed files, replace bad ones, clean up after failure ----------
def gzip_with_name_and_mtime(raw: bytes) -> bytes:
    import io
    buf = io.BytesIO()
    with gzip.GzipFile("original-name", "wb", compresslevel=1, fileobj=buf, mtime=1234567) as gz:
        gz.write(raw)
    return buf.getvalue()


def test_download_keeps_recompressed_files(tmp_path):
    spec, folder, _ = make_spec(tmp_path)  # published: gzip.compress(raw, mtime=0)
    dest = tmp_path / "dest"
    dest.mkdir()
    for f in spec.files:
        raw = gzip.decompress((folder / f"{f.name}.gz").read_bytes())
        (dest / f"{f.name}.gz").write_bytes(gzip_with_name_and_mtime(raw))
        assert hashlib.sha256((dest / f"{f.name}.gz").read_bytes()).hexdigest() != f.gz_sha256
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    refused = ("http://127.0.0.1:9/refused/",)  # any download attempt would fail
    assert D.download(spec, dest, urls=refused) == dest
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def flip_last_byte(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 1])


@pytest.mark.parametrize("corrupt", [
    lambda gz: gz[:len(gz) // 2],  # truncated
    lambda gz: gzip.compress(flip_last_byte(gzip.decompress(gz))),  # valid gzip, wrong contents
])
def test_download_replaces_or_refuses_a_bad_existing_file(tmp_path, server, corrupt):
    spec, folder, _ = make_spec(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    for f in spec.files:
        (dest / f"{f.name}.gz").write_bytes((folder / f"{f.name}.gz").read_bytes())
    bad = dest / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(D.DataError, match=rf"^could not download {bad} \(127\.0\.0\.1:9: [^\n]*\); "
                       "check the network, or put the published file there by hand$"):
        D.download(spec, dest, urls=("http://127.0.0.1:9/refused/",))
    assert bad.read_bytes() != (folder / bad.name).read_bytes()  # refused, left as it was
    D.download(spec, dest, urls=(server,))
    assert bad.read_bytes() == (folder / bad.name).read_bytes()  # replaced


def test_failed_download_removes_only_the_folders_it_created(tmp_path):
    spec, _, _ = make_spec(tmp_path)
    (tmp_path / "kept").mkdir()
    dest = tmp_path / "kept" / "a" / "b"
    with pytest.raises(D.DataError, match="could not download"):
        D.download(spec, dest, urls=("http://127.0.0.1:9/refused/",))
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_failed_download_keeps_files_already_fetched(tmp_path, server):
    spec, folder, _ = make_spec(tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()  # the server lacks the third file
    dest = tmp_path / "new"
    with pytest.raises(D.DataError, match=r"t10k-images-idx3-ubyte.gz \(127\.0\.0\.1:\d+: HTTP Error 404"):
        D.download(spec, dest, urls=(server,))
    assert sorted(p.name for p in dest.iterdir()) == ["train-images-idx3-ubyte.gz",
                                                      "train-labels-idx1-ubyte.gz"]


def test_download_into_a_file_is_a_data_error(tmp_path):
    spec, folder, _ = make_spec(tmp_path)
    target = folder / "train-images-idx3-ubyte.gz"
    with pytest.raises(D.DataError, match=rf"cannot create download folder {target} .*writable"):
        D.download(spec, target, urls=("http://127.0.0.1:9/refused/",))


def test_known_checksums_are_well_formed():
    for spec in D.IDX_SPECS.values():
        for f in spec.files:
            assert len(f.gz_sha256) == len(f.sha256) == 64
            int(f.gz_sha256, 16), int(f.sha256, 16)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    ds = D.load_dataset("fashion-mnist", allow_download=False)
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert np.bincount(ds.train_y).tolist() == [6000] * 10
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0


def test_digits_split_is_fixed_and_stratified():
    a, b = D.load_digits(), D.load_digits()
    assert a.train_x.shape == (1297, 64) and a.test_x.shape == (500, 64)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert np.bincount(a.test_y).min() >= 45
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        D.load_dataset("cifar")


def test_digits_are_scikit_learns_split_read_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    from bnlab.lab.data import load_digits

    ours = load_digits()
    bunch = sk_load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=500, random_state=0, stratify=y)
    for a, b in [(ours.train_x, tr_x), (ours.test_x, te_x), (ours.train_y, tr_y),
                 (ours.test_y, te_y)]:
        assert a.dtype == b.dtype and np.array_equal(a, b)
    code = ("import sys; from bnlab.lab.data import load_digits; load_digits(); "
            "assert not any(m.startswith('sklearn') for m in sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
