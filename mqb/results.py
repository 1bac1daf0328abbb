"""Result records: stable config ids, atomic JSON writes, reading a results directory."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

import mqb

#: Top-level keys that do not change what is computed (outputs, logging, resuming; ``deploy``: read by
#: ``python -m mqb.deploy`` only; ``trainer`` but for :data:`HASHED_TRAINER_OPTIONS`).
VOLATILE_KEYS = ("paths", "results_dir", "resume", "logger", "auto_train", "trainer", "deploy", "quant")
#: ``trainer`` options that change the numbers: hashed (as ``trainer.KEY``) only away from their default, so the
#: ids of records made at the default are the ids they had. ``fp32_precision=tf32`` changes the FP32 arithmetic.
HASHED_TRAINER_OPTIONS = (("fp32_precision", "ieee"),)
#: Keys at any depth that only say where things are cached or how fast data loads.
NESTED_VOLATILE_KEYS = ("cache_dir", "num_workers")
#: Options that only say what else to write (not what is computed): never part of the id.
VOLATILE_OPTIONS = (("eval", "save_predictions"),)
#: Options added after records existed, dropped from the id while at their default so earlier records keep theirs.
DEFAULT_OPTIONS = (("calibration", "shared_ranges", False), ("calibration", "tensor_quantizers", False),
                   ("calibration", "draws", 1))
#: Options renamed after records existed: new key -> old key. The id hashes the old spelling (a true value moves
#: there, a false one is dropped), so old and new spellings give one id and earlier records keep theirs; the old
#: spelling still works as a deprecated alias (:data:`mqb.config.DEPRECATED_KEYS`).
RENAMED_OPTIONS = {
    "method.shared_ranges": "calibration.shared_ranges",
    "method.output_quantizers": "calibration.tensor_quantizers",
}
#: Options whose computation changed after records existed: key (as hashed, after :data:`RENAMED_OPTIONS`) ->
#: the version hashed in place of ``true`` (``true`` is version 1), so a record of the earlier computation is not
#: taken for the new one. ``calibration.tensor_quantizers`` 2: an output quantizer goes after the last module that
#: writes the tensor in place (nnU-Net's / MONAI's ``LeakyReLU(inplace=True)``), not ahead of it on the norm, where
#: its readers quantized the value a second time (:mod:`mqb.quant.methods.shared_ranges`).
OPTION_VERSIONS = {"calibration.tensor_quantizers": 2}
#: Groups that do not matter when nothing is quantized (fp32/fp16/bf16).
QUANT_ONLY_KEYS = ("granularity", "method", "calibration")


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_id(cfg: DictConfig) -> str:
    """Hash of the resolved config minus output/logging keys (and quantization keys for float precisions)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("logger", None)  # may interpolate Hydra's runtime output dir
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
    hashed_trainer = {k: trainer[k] for k, default in HASHED_TRAINER_OPTIONS if trainer.get(k, default) != default}
    for key in VOLATILE_KEYS:
        data.pop(key, None)
    if hashed_trainer:
        data["trainer"] = hashed_trainer
    _drop_nested(data, NESTED_VOLATILE_KEYS)
    for group, key in VOLATILE_OPTIONS:
        if isinstance(data.get(group), dict):
            data[group].pop(key, None)
    for new, old in RENAMED_OPTIONS.items():
        (new_group, new_key), (old_group, old_key) = new.split("."), old.split(".")
        value = data[new_group].pop(new_key, False) if isinstance(data.get(new_group), dict) else False
        if value and isinstance(data.get(old_group), dict):
            data[old_group][old_key] = True
    for option, version in OPTION_VERSIONS.items():
        group, key = option.split(".")
        if isinstance(data.get(group), dict) and data[group].get(key) is True:
            data[group][key] = version
    for group, key, default in DEFAULT_OPTIONS:
        if isinstance(data.get(group), dict) and data[group].get(key, default) == default:
            data[group].pop(key, None)
    dataset = data.get("dataset")
    if isinstance(dataset, dict) and (dataset.get("pixdim") is None or dataset.get("score_on") == "resampled"):
        # the grid scored on only differs from the grid the network saw where the data is resampled; scored on the
        # resampled grid, a record's numbers are those the records before dataset.score_on existed had
        dataset.pop("score_on", None)
    precision = data.get("precision") or {}
    if precision.get("weight") is None and precision.get("activation") is None:
        for key in QUANT_ONLY_KEYS:
            data.pop(key, None)
    return stable_hash(data)


def _drop_nested(data: Any, keys: tuple[str, ...]) -> None:
    if isinstance(data, dict):
        for key in keys:
            data.pop(key, None)
        for value in data.values():
            _drop_nested(value, keys)
    elif isinstance(data, list):
        for value in data:
            _drop_nested(value, keys)


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a unique hidden temporary path beside ``path`` (same file name ending, so writers that look at the
    extension work); rename it over ``path`` if the block succeeds, remove it if it fails. Readers and concurrent
    writers never see a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{os.getpid()}@{_HOST_TAG}.{uuid.uuid4().hex}.{target.name}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON through :func:`atomic_write`, fsynced before the rename."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def save_tensors_atomic(path: str | os.PathLike[str], tensors: dict[str, Any]) -> None:
    """``torch.save`` a (nested) dict of tensors through :func:`atomic_write`."""
    import torch

    with atomic_write(path) as tmp:
        torch.save(tensors, tmp)


# -- reading records: one schema for every reader ---------------------------------------------------------
#: Record statuses; an error record (``<id>.error.json``) needs ``error``, a success record of an evaluation
#: (``<id>.json``) needs the metrics and labels every table reads.
RECORD_STATUSES = ("success", "error")
_METRIC_KEYS = ("dsc", "nsd", "hd95")
_LABEL_KEYS = ("model", "dataset", "precision", "granularity", "method")
#: Success records of other kinds (a layer-sensitivity study) carry one of these keys instead of metrics.
OTHER_KINDS = ("sensitivity",)


@dataclass(frozen=True)
class BadRecord:
    """A record file no reader can use: unreadable, not JSON, or not a valid record (``reason`` says which)."""

    path: Path
    reason: str

    @property
    def record_id(self) -> str:
        """The config id the file name promises (``<id>.json`` / ``<id>.error.json``)."""
        return record_id_of(self.path)

    def message(self) -> str:
        return (f"mqb: ignoring corrupt record {self.path}: {self.reason} (treated as missing: a resumed sweep "
                "re-runs the config)")  # fmt: skip


def record_id_of(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    for suffix in (".error.json", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def validate_record(record: Any) -> str | None:
    """Why ``record`` is not a valid result record, or ``None`` when it is (the one schema of every reader)."""
    if not isinstance(record, dict):
        return f"not a JSON object (a {type(record).__name__})"
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        return "no 'id' string"
    status = record.get("status")
    if status not in RECORD_STATUSES:
        return f"'status' is {status!r}, not one of {', '.join(RECORD_STATUSES)}"
    if "created" in record and not isinstance(record["created"], str):
        return "'created' is not a string"
    if status == "error":
        if not isinstance(record.get("error"), str):
            return "error record without an 'error' message"
        return None
    if any(kind in record for kind in OTHER_KINDS):
        return None
    for key in _LABEL_KEYS:
        if not isinstance(record.get(key), str):
            return f"success record without a {key!r} string"
    for group in ("metrics", "delta_pct"):
        values = record.get(group)
        if not isinstance(values, dict):
            return f"success record without {group!r}"
        for key in _METRIC_KEYS:
            if key not in values or not _is_number_or_none(values[key]):
                return f"{group}.{key} is missing or not a number"
    return None


def check_record(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, BadRecord | None]:
    """``(record, None)`` for a valid record file, ``(None, BadRecord)`` for a corrupt one, ``(None, None)``
    when there is no such file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, BadRecord(path, f"unreadable ({err.strerror or err})")
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None, BadRecord(path, "not UTF-8 text")
    except json.JSONDecodeError as err:
        what = "empty" if not data.strip() else f"invalid JSON, truncated? ({err.msg} at line {err.lineno})"
        return None, BadRecord(path, what)
    problem = validate_record(record)
    if problem is not None:
        return None, BadRecord(path, problem)
    return record, None


def warn_bad_record(bad: BadRecord) -> None:
    print(bad.message(), file=sys.stderr)


def read_record(
    path: str | os.PathLike[str], on_bad: Callable[[BadRecord], None] | None = warn_bad_record
) -> dict[str, Any] | None:
    """The record in ``path``, or ``None`` when it is missing or corrupt (a corrupt one is reported to
    ``on_bad``, by default on stderr naming the file)."""
    record, bad = check_record(path)
    if bad is not None and on_bad is not None:
        on_bad(bad)
    return record


def record_files(results_dir: str | os.PathLike[str]) -> list[Path]:
    """The record files of a results directory (hidden in-flight writes and lock files excluded)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def load_records(results_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[BadRecord]]:
    """``(valid records sorted by creation time, corrupt record files)`` of a results directory."""
    records, bad = [], []
    for path in record_files(results_dir):
        record, problem = check_record(path)
        if problem is not None:
            bad.append(problem)
        elif record is not None:
            records.append(record)
    return sorted(records, key=lambda r: str(r.get("created", ""))), bad


def read_records(
    results_dir: str | os.PathLike[str], on_bad: Callable[[BadRecord], None] | None = warn_bad_record
) -> list[dict[str, Any]]:
    """All valid success and error records of a results directory, sorted by creation time; each corrupt record
    file is reported to ``on_bad`` (by default on stderr, naming the file) and left out."""
    records, bad = load_records(results_dir)
    if on_bad is not None:
        for problem in bad:
            on_bad(problem)
    return records


# -- writability, leftovers of killed writers ----------------------------------------------------------------
class ResultsDirError(OSError):
    """The results directory cannot take a record (read-only, full, not a directory)."""


def check_writable(folder: str | os.PathLike[str], probe_bytes: int = 1 << 16) -> None:
    """Create ``folder`` and write, fsync and remove a probe file there; raise :class:`ResultsDirError` saying
    why when that fails (read-only, no space left, not a directory), before any work is done."""
    folder = Path(folder)
    probe = folder / f".{os.getpid()}@{_HOST_TAG}.{uuid.uuid4().hex}.probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        why = {errno.ENOSPC: "no space left", errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EDQUOT: "disk quota exceeded"}.get(err.errno or -1, err.strerror or str(err))  # fmt: skip
        raise ResultsDirError(err.errno or errno.EIO, f"results_dir {str(folder)!r} cannot take records ({why}); "
                              "nothing was evaluated") from err  # fmt: skip
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", platform.node())[:64] or "host"


_HOST_TAG = _host_tag()
#: ``.<pid>[@<host>].<32 hex>.<name>``: a temporary file of :func:`atomic_write` (older versions: no host).
_TEMP_NAME = re.compile(r"^\.(\d+)(?:@([A-Za-z0-9_-]*))?\.([0-9a-f]{32})\.(.+)$")
#: A temporary file this old is a leftover whatever wrote it (a record is written in well under a second).
TEMP_MAX_AGE_S = 600.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_temp_files(folder: str | os.PathLike[str], max_age_s: float = TEMP_MAX_AGE_S) -> list[Path]:
    """Remove the temporary files of killed writers in ``folder``: those of a dead process of this host at once,
    any older than ``max_age_s``. Returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None or path.suffix == ".lock":
            continue
        pid, host = int(match.group(1)), match.group(2)
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        dead_here = host == _HOST_TAG and pid != os.getpid() and not pid_alive(pid)
        if dead_here or age > max_age_s:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


# -- claims: one process computes a config -------------------------------------------------------------------
#: A claim's lock file is touched this often while its process works ...
LOCK_HEARTBEAT_S = 30.0
#: ... and a lock not touched for this long is stale whatever host holds it (a crashed node).
LOCK_STALE_S = float(os.environ.get("MQB_LOCK_STALE_SECONDS", "600"))


@dataclass(frozen=True)
class LockInfo:
    """Who holds a config's claim (the content of ``.<id>.lock``)."""

    path: Path
    pid: int
    host: str
    created: str
    token: str
    age_s: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.created}"


def lock_path(results_dir: str | os.PathLike[str], cid: str) -> Path:
    return Path(results_dir) / f".{cid}.lock"


def read_lock(path: Path) -> LockInfo | None:
    """The holder of a lock file, or ``None`` when there is none (an unreadable one reads as pid 0)."""
    try:
        stat = path.stat()
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        text, stat = "", None
    age = time.time() - stat.st_mtime if stat is not None else 0.0
    try:
        data = json.loads(text)
        assert isinstance(data, dict)
        return LockInfo(path, int(data["pid"]), str(data["host"]), str(data["created"]), str(data["token"]), age)
    except (ValueError, KeyError, TypeError, AssertionError):
        return LockInfo(path, 0, "?", "?", "", age)  # being written, or garbage


def lock_is_stale(info: LockInfo) -> bool:
    """A lock of a dead process of this host, an unreadable one older than a heartbeat, or one whose holder has
    not touched it for :data:`LOCK_STALE_S` (any host)."""
    if info.age_s > LOCK_STALE_S:
        return True
    if info.pid == 0:
        return info.age_s > LOCK_HEARTBEAT_S
    if info.host != platform.node():
        return False
    if not pid_alive(info.pid):
        return True
    try:  # the pid was reused by a process started after the lock was taken
        import psutil

        created = datetime.fromisoformat(info.created).timestamp()
        return psutil.Process(info.pid).create_time() > created + 2.0
    except Exception:  # noqa: BLE001
        return False


def lock_holder(results_dir: str | os.PathLike[str], cid: str) -> LockInfo | None:
    """The live holder of a config's claim, or ``None`` (no lock, or a stale one)."""
    info = read_lock(lock_path(results_dir, cid))
    return None if info is None or lock_is_stale(info) else info


class Claim:
    """This process's claim on a config: the lock file ``.<id>.lock`` (pid, host, time), touched by a heartbeat
    thread until :meth:`release`."""

    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"mqb-claim-{path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        info = read_lock(self.path)
        if info is not None and info.token == self.token:
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_claim(results_dir: str | os.PathLike[str], cid: str) -> Claim | LockInfo:
    """Claim a config before computing it: a :class:`Claim` when this process got it, else the
    :class:`LockInfo` of the live process that holds it. A stale lock (dead process) is broken and retaken."""
    path = lock_path(results_dir, cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_lock(path)
            if info is None:
                continue  # released meanwhile
            if not lock_is_stale(info):
                return info
            _break_lock(path, info)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": platform.node(), "created": datetime.now(UTC).isoformat(),
                       "token": token}, f)  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        return Claim(path, token)
    info = read_lock(path)
    if info is not None:
        return info
    raise OSError(errno.EAGAIN, f"could not claim {path}")


def _break_lock(path: Path, stale: LockInfo) -> None:
    """Move a stale lock aside; put it back if another process replaced it in the meantime (not stale)."""
    aside = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    moved = read_lock(aside)
    if moved is not None and moved.token != stale.token and not lock_is_stale(moved):
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def git_commit() -> dict[str, Any]:
    root = Path(mqb.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def host_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mqb": mqb.__version__,
        "pid": os.getpid(),  # which worker ran the config (hydra/launcher=mqb_pool)
    }
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def is_rank_zero() -> bool:
    """Only the first process writes records and caches (DDP children re-run the same job)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
