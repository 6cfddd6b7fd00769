"""Datasets for the lab: scikit-learn's 8x8 digits, Fashion-MNIST and MNIST.

Every dataset comes back as a :class:`Dataset` of float32 inputs in [0, 1], flattened to
(N, features), and int64 labels. IDX files (the MNIST format) are read by bnlab's own reader
and checked three ways: the header against the data length (a file is read no further
than its header says it goes, so a .gz that decompresses to more is refused, not read into
memory), the SHA-256 of the decompressed bytes against the published files', and the image
count against the label count. Any mismatch raises :class:`DataError` naming the file; a
partial dataset is never returned.

An explicit ``data_dir`` (``--data-dir``) is the only place looked in (itself or its
``<name>/`` subfolder): if it lacks the files that is an error, never a silent fallback.
Without one, IDX files are looked for, in order, in ``$BNLAB_DATA``, the Debian package
location ``/usr/share/datasets/<name>``, and bnlab's cache (``$XDG_CACHE_HOME/bnlab/<name>``,
by default ``~/.cache/bnlab/<name>``). If none holds the files and downloading is allowed,
they are fetched into the cache from the dataset's official location, verified against the
published SHA-256 sums and moved into place atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import logging
import math
import os
import struct
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab._io import atomic_write
from .fields import DATASETS, _memory_bytes, flag, spelling_is

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "DataError", "Dataset", "DownloadError", "IdxFile", "find_idx_dir",
           "load_dataset", "read_idx"]


class DataError(RuntimeError):
    """A dataset is missing, truncated or corrupt; the message says which file and why."""


class DownloadError(DataError):
    """A file could not be downloaded from any location; ``why`` says what each answered."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: np.ndarray  # (N_train, features) float32 in [0, 1]
    train_y: np.ndarray  # (N_train,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_features(self) -> int:
        return int(self.train_x.shape[1])


@dataclass(frozen=True)
class IdxFile:
    name: str  # without .gz
    gz_sha256: str  # of the published .gz: checked on download
    sha256: str  # of the decompressed bytes: checked on every load (survives re-compression)


@dataclass(frozen=True)
class IdxSpec:
    name: str
    urls: tuple[str, ...]  # base locations, tried in order
    files: tuple[IdxFile, IdxFile, IdxFile, IdxFile]  # train images, train labels, test images, test labels
    classes: tuple[str, ...]


FASHION_MNIST = IdxSpec(
    name="fashion-mnist",
    urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files=(
        IdxFile("train-images-idx3-ubyte",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        IdxFile("train-labels-idx1-ubyte",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        IdxFile("t10k-images-idx3-ubyte",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        IdxFile("t10k-labels-idx1-ubyte",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
             "Sneaker", "Bag", "Ankle boot"),
)

MNIST = IdxSpec(
    name="mnist",
    urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",
          "https://storage.googleapis.com/cvdf-datasets/mnist/",
          "http://yann.lecun.com/exdb/mnist/"),
    files=(
        IdxFile("train-images-idx3-ubyte",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        IdxFile("train-labels-idx1-ubyte",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        IdxFile("t10k-images-idx3-ubyte",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        IdxFile("t10k-labels-idx1-ubyte",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ),
    classes=tuple(str(d) for d in range(10)),
)

SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
IDX_SPECS = {s.name: s for s in (FASHION_MNIST, MNIST)}

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- IDX ----------------------------------------------------------------------------------
# What gzip raises for truncated or garbled data: zlib.error is not an OSError.
_CORRUPT = (EOFError, gzip.BadGzipFile, zlib.error)
# Deflate turns one 2-bit code into at most 258 bytes: no .gz of n bytes holds more than
# about 1032 n (RFC 1951; gzip's header and trailer only lower the ratio).
_GZIP_RATIO = 1032
_CHUNK = 1 << 20


def _bad_idx(source: str, why: str) -> DataError:
    return DataError(f"{source}: {why}; the file is corrupt or not an MNIST-format file, "
                     "delete it and fetch it again")


def _parse_header(head: bytes, source: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and header length of IDX bytes that start with ``head``: magic
    (0, 0, dtype, ndim), then ndim big-endian uint32 sizes."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise _bad_idx(source, f"not an IDX file (magic number {head[:4].hex()}, "
                               "expected 0000 then type and rank)")
    dtype_code, ndim = head[2], head[3]
    if dtype_code not in _IDX_DTYPES:
        raise _bad_idx(source, f"unknown IDX data type 0x{dtype_code:02x}, expected one of "
                               + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES))
    length = 4 + 4 * ndim
    if len(head) < length:
        raise _bad_idx(source, f"truncated IDX header ({len(head)} bytes, expected {length})")
    return np.dtype(_IDX_DTYPES[dtype_code]), struct.unpack(f">{ndim}I", head[4:length]), length


def _data_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _short(source: str, shape: tuple[int, ...], expected: int, held: int | str) -> DataError:
    return _bad_idx(source, f"header promises shape {shape} ({expected} bytes of data) but the "
                            f"file holds {held}")


def parse_idx(data: bytes | bytearray, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes: magic (0, 0, dtype, ndim), ndim big-endian uint32 sizes, then data."""
    dtype, shape, header = _parse_header(bytes(data[:4 + 4 * 255]), source)
    expected = _data_bytes(dtype, shape)
    if len(data) - header != expected:
        raise _short(source, shape, expected, len(data) - header)
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _read_bytes(path: Path) -> bytearray:
    """The IDX bytes of ``path``, decompressed when it ends in .gz, read no further than its
    header says they go: a file that holds (or would decompress to) more or less is refused,
    naming it, without being read whole into memory."""
    compressed = path.suffix == ".gz"
    try:
        # a raw file can hold no more than its size, a .gz no more than deflate expands to
        limit = os.path.getsize(path) * (_GZIP_RATIO if compressed else 1)
        with (gzip.open if compressed else open)(path, "rb") as fh:
            head = fh.read(4)
            head += fh.read(4 * head[3]) if len(head) == 4 else b""
            dtype, shape, _ = _parse_header(head, str(path))
            expected = _data_bytes(dtype, shape)
            _check_plausible(path, shape, expected, limit)
            data = bytearray(head)
            while len(data) - len(head) < expected:  # chunk by chunk: memory grows only
                chunk = fh.read(min(_CHUNK, expected - len(data) + len(head)))  # as data comes
                if not chunk:
                    raise _short(str(path), shape, expected, len(data) - len(head))
                data += chunk
            if fh.read(1):
                raise _short(str(path), shape, expected, "more" + (" once decompressed"
                                                                   if compressed else ""))
        return data
    except _CORRUPT as exc:
        raise DataError(f"{path}: cannot be read ({exc}); the file is truncated or corrupt, "
                        "delete it and fetch it again") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); make it a readable file "
                        f"or point {flag('data_dir')} elsewhere") from exc


def _check_plausible(path: Path, shape: tuple[int, ...], expected: int, limit: int) -> None:
    """Refuse a header that promises more data than the file can hold, or than fits."""
    if expected > limit:
        raise _short(str(path), shape, expected, f"at most {limit}" + (
            f" (deflate expands its {limit // _GZIP_RATIO} bytes at most {_GZIP_RATIO}-fold)"
            if path.suffix == ".gz" else ""))
    if expected > _memory_bytes() / 2:
        raise _bad_idx(str(path), f"header promises shape {shape} ({expected / 2**30:.1f} GiB "
                                  "of data), more than half of this machine's memory")


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), checking the decompressed SHA-256."""
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DataError(f"{path}: SHA-256 of its contents is {actual}, expected {sha256}; "
                            "the file is corrupt or not the published one, delete it and fetch it again")
    return parse_idx(data, str(path))


# -- locating and downloading -------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab"


def search_dirs(name: str) -> list[Path]:
    """Where ``name``'s IDX files are looked for, in order, when no folder is given."""
    env = os.environ.get("BNLAB_DATA")
    return ([Path(env), Path(env) / name] if env else []) + [SYSTEM_DATA_DIR / name,
                                                             cache_dir() / name]


def _file_in(directory: Path, f: IdxFile) -> Path | None:
    for candidate in (directory / f"{f.name}.gz", directory / f.name):
        if os.path.isfile(candidate):  # unlike Path.is_file, never raises (e.g. EACCES)
            return candidate
    return None


def _missing(directory: Path, spec: IdxSpec) -> list[str]:
    return [f"{f.name}.gz" for f in spec.files if _file_in(directory, f) is None]


def _explicit_dir(spec: IdxSpec, data_dir: str | os.PathLike) -> Path:
    """The folder holding all of ``spec``'s files: ``data_dir`` or its ``spec.name``
    subfolder. Checks names only, so it is cheap; anything short of all four is an error."""
    d = Path(data_dir)
    for candidate in (d, d / spec.name):
        if os.path.isdir(candidate) and not _missing(candidate, spec):
            return candidate
    problem = ("does not exist" if not os.path.exists(d) else "is a file, not a folder"
               if not os.path.isdir(d) else f"lacks {', '.join(_missing(d, spec))} "
               f"(looked in it and in {d / spec.name})")
    names = ", ".join(f"{f.name}.gz" for f in spec.files)
    raise DataError(
        f"{spec.name} data folder {d} {problem}. Pass a folder holding {names} (or their "
        f"uncompressed versions, directly or in a {spec.name}/ subfolder), or omit "
        f"{flag('data_dir')} "
        f"to use the default search ($BNLAB_DATA, {SYSTEM_DATA_DIR / spec.name}, "
        f"{cache_dir() / spec.name}, download).")


def find_idx_dir(spec: IdxSpec) -> Path | None:
    """The first of :func:`search_dirs` holding all four files of ``spec``, or None."""
    for d in search_dirs(spec.name):
        if all(_file_in(d, f) for f in spec.files):
            return d
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically: a temporary file in the same folder, checked
    against ``sha256``, then renamed. A failed or interrupted download leaves nothing at
    ``dest``."""
    def fetch(out) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)

    def verify(tmp: Path) -> None:
        actual = _sha256_file(tmp)
        if actual != sha256:
            raise DataError(f"downloaded file has SHA-256 {actual}, expected {sha256}; "
                            "the server sent a different file")

    return atomic_write(dest, fetch, check=verify)


def download(spec: IdxSpec, dest_dir: Path | None = None,
             urls: tuple[str, ...] | None = None) -> Path:
    """Download ``spec``'s four files into ``dest_dir`` (default: the cache), trying each
    base URL in turn. Files already present and correct are kept. On failure, the folders
    this call created and left empty are removed again."""
    dest_dir = cache_dir() / spec.name if dest_dir is None else Path(dest_dir)
    created = [p for p in (dest_dir, *dest_dir.parents) if not os.path.exists(p)]
    try:
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create download folder {dest_dir} ({exc.strerror}); "
                            "choose a writable folder (bnlab download --dest)") from exc
        for f in spec.files:
            dest = dest_dir / f"{f.name}.gz"
            if not _is_published(dest, f):
                _fetch(spec, f, dest, urls or spec.urls)
    except BaseException:
        _remove_empty(created)
        raise
    return dest_dir


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first: once one is not empty, neither are its parents
        try:
            d.rmdir()
        except OSError:
            return


def _is_published(path: Path, f: IdxFile) -> bool:
    """Whether ``path`` holds ``f``: the published .gz itself, or a re-compression of it
    (Debian's lack the file name, so only the decompressed bytes match)."""
    if not os.path.isfile(path):
        return False
    try:
        return (_sha256_file(path) == f.gz_sha256
                or hashlib.sha256(_read_bytes(path)).hexdigest() == f.sha256)
    except (OSError, DataError):
        return False  # corrupt or unreadable: fetch it again


def _fetch(spec: IdxSpec, f: IdxFile, dest: Path, urls: tuple[str, ...]) -> None:
    failed: dict[str, list[str]] = {}  # why -> the hosts that failed so (often all, alike)
    for base in urls:
        url = base.rstrip("/") + f"/{f.name}.gz"
        log.info("downloading %s", url)
        try:
            download_file(url, dest, f.gz_sha256)
            return
        except (urllib.error.URLError, http.client.HTTPException, ValueError, OSError,
                DataError) as exc:
            failed.setdefault(str(exc), []).append(urllib.parse.urlsplit(url).netloc or url)
    tried = "; ".join(f"{', '.join(hosts)}: {why}" for why, hosts in failed.items())
    raise DownloadError(f"could not download {dest} ({tried}); check the network, or put the "
                        "published file there by hand", tried)


def _not_found(spec: IdxSpec, failed: str | None) -> DataError:
    """One line: where the files were looked for, why a download failed, what fixes it."""
    looked = " or ".join(str(d) for d in search_dirs(spec.name))
    how = (f"get it with: bnlab download {spec.name} (in Python: "
           f"bnlab.lab.data.download(bnlab.lab.data.IDX_SPECS[{spec.name!r}])), or pass "
           "data_dir='FOLDER' with its four IDX files"
           if spelling_is("python") else f"get it with: bnlab download {spec.name}, or pass "
           f"{flag('data_dir')} FOLDER with its four IDX files")
    if failed is None:
        return DataError(f"{spec.name} not found in {looked}; {how}")
    return DataError(f"{spec.name} not found in {looked}, and downloading it failed ({failed}); "
                     f"once online, {how}")


def load_idx_dataset(spec: IdxSpec, data_dir: str | os.PathLike | None = None,
                     allow_download: bool = True) -> Dataset:
    if data_dir is not None:
        directory = _explicit_dir(spec, data_dir)
    else:
        directory = find_idx_dir(spec)
        failed = None
        if directory is None and allow_download:
            try:
                directory = download(spec)
            except DataError as exc:
                failed = getattr(exc, "why", str(exc))
        if directory is None:
            raise _not_found(spec, failed)
    arrays = [read_idx(_file_in(directory, f), f.sha256) for f in spec.files]
    train_x, train_y, test_x, test_y = arrays
    for images, labels, which in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if len(images) != len(labels):
            raise DataError(f"{directory}: {which} set has {len(images)} images but "
                            f"{len(labels)} labels; the files do not belong together, "
                            "replace them with the published ones")
    log.info("loaded %s from %s", spec.name, directory)
    return Dataset(spec.name, _to_float(train_x), train_y.astype(np.int64),
                   _to_float(test_x), test_y.astype(np.int64), spec.classes)


def _to_float(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1).astype(np.float32) / 255.0)


# -- digits -------------------------------------------------------------------------------
DIGITS_SPLIT = Path(__file__).with_name("digits_split.npz")  # the split's row numbers, in order


def load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits (shipped with it, no download): a fixed split of
    1297 train / 500 test, drawn once with seed 0 and stratified by class
    (``train_test_split(..., test_size=500, random_state=0, stratify=y)``), in that split's
    order. The file is read where scikit-learn keeps it and the split's row numbers are
    bnlab's own (``digits_split.npz``; a test checks them against scikit-learn's), so a run
    does not import scikit-learn, which takes a second or more."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset ships with scikit-learn, which is not installed "
                        "here: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    try:
        table = np.loadtxt(path, delimiter=",")
        split = np.load(DIGITS_SPLIT)
        train, test = split["train"].astype(np.int64), split["test"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read the digits dataset ({exc})") from None
    if table.shape != (1797, 65) or (len(train), len(test)) != (1297, 500) \
            or sorted(train.tolist() + test.tolist()) != list(range(1797)):
        raise DataError(f"{path} is not scikit-learn's 1797 8x8 digits "
                        f"(a table of {table.shape})")
    x = (table[:, :-1] / 16.0).astype(np.float32)  # pixel values are 0..16
    y = table[:, -1].astype(np.int64)
    return Dataset("digits", x[train], y[train], x[test], y[test],
                   tuple(str(d) for d in range(10)))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 allow_download: bool = True) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); ``data_dir`` is ignored for digits, which
    ships with scikit-learn."""
    if name == "digits":
        return load_digits()
    if name not in IDX_SPECS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return load_idx_dataset(IDX_SPECS[name], data_dir, allow_download)
