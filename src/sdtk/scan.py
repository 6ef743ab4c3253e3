"""`scan_file(path) -> ScanResult`: is a model file safe to load? Nothing in it is ever executed.

Verdicts:
- "safe": the whole structure was checked (every pickle in the file interpreted by our own
  restricted interpreter, zip directory and CRCs, tensors within their storages, or a strict
  safetensors header) and it holds only what a tensor file legitimately holds.
- "unsafe": it names something outside the allowlist (a global, an opcode), or its container is
  ambiguous in a way loaders and scanners read differently (zip name swap, duplicate records,
  encryption flags...), or it is a format that runs code by design (TorchScript, torch tar,
  numpy object arrays).
- "unreadable": missing, truncated, corrupt (CRC mismatch) or not a model file we know.
Tensor values are never read into memory; only CRCs stream over the mapped file.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from sdtk.errors import FormatError, SdtkError, UnsafeFileError, UnsupportedFormatError
from sdtk.fileio import open_input
from sdtk.formats import detect_format
from sdtk.formats.npyheader import NPY_HEADER_LIMIT, npy_has_objects as _npy_has_objects, npy_header as _npy_header
from sdtk.formats.picklevm import PickleVM, StorageRef, StorageType

SAFE, UNSAFE, UNREADABLE = "safe", "unsafe", "unreadable"
MAX_TAR_MEMBER_SCAN = 64 << 20  # bytes of each tar member interpreted to name its payload
PICKLE_SCAN_LIMIT = 4 << 20  # deflated pickle records past this must keep a plausible ratio (zipread)
SEVERITY = {SAFE: 0, UNREADABLE: 1, UNSAFE: 2}

# Files a folder scan looks at (explicit file arguments are always scanned).
# Sources: extensions of A1111/ComfyUI model folders, torch.save conventions, numpy.save.
MODEL_EXTENSIONS = {".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".sft", ".pkl", ".pickle",
                    ".npy", ".npz", ".zip", ".pt2", ".mar", ".tar", ".7z", ".joblib", ".dat", ".data", ".gguf"}


@dataclass
class Finding:
    verdict: str  # "unsafe" or "unreadable"
    message: str


@dataclass
class ScanResult:
    path: str
    verdict: str
    reason: str
    format: str
    findings: List[Finding] = field(default_factory=list)
    tensors: Optional[int] = None
    globals: List[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["findings"] = [asdict(f) for f in self.findings]
        return out


class _Scan:
    def __init__(self, path: str, source=None):
        self.path = path
        self.source = source  # formats.source.ByteSource: a remote object read in place
        self.findings: List[Finding] = []
        self.globals: List[str] = []
        self.tensors: Optional[int] = None
        self.format = "unknown"

    def add(self, verdict: str, message: str) -> None:
        self.findings.append(Finding(verdict, message))

    def add_error(self, err: SdtkError) -> None:
        self.add(UNSAFE if isinstance(err, UnsafeFileError) else UNREADABLE, err.problem)

    def vm(self, data, what: str, *, storages: bool = False, start: int = 0) -> PickleVM:
        def any_storage(pid):
            # scanning only: accept torch storage ids; the real reader checks them against records
            if isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], StorageType):
                return StorageRef(str(pid[2]), pid[1], str(pid[3]), 0, 1 << 62)
            if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":  # legacy nn.Module class id
                return pid[1]
            raise FormatError(self.path, f"{what}: unexpected persistent id")

        return PickleVM(data, path=self.path, what=what, persistent_load=any_storage if storages else None)

    def run_pickle(self, data, what: str, *, storages: bool = False, start: int = 0) -> Optional[int]:
        """Interpret one pickle; record findings; return the offset after it (None on failure)."""
        vm = self.vm(data, what, storages=storages)
        vm.base_offset = 0
        try:
            _, end = vm.run(start)
            return end
        except SdtkError as e:
            self.add_error(e)
            return None
        finally:
            self.globals.extend(g for g in vm.globals_seen if g not in self.globals)

    def result(self) -> ScanResult:
        if not self.findings:
            verdict, reason = SAFE, _safe_reason(self.format, self.tensors)
        else:
            worst = max(self.findings, key=lambda f: SEVERITY[f.verdict])
            verdict, reason = worst.verdict, worst.message
        return ScanResult(self.path, verdict, reason, self.format, self.findings, self.tensors, self.globals)


def _safe_reason(fmt: str, tensors: Optional[int]) -> str:
    if fmt == "safetensors":
        return f"safetensors, strict header valid ({tensors} tensors)"
    if fmt in ("torch-zip", "torch-legacy"):
        return f"{fmt} checkpoint: only allowlisted globals, structure checked ({tensors} tensors)"
    if fmt == "pickle":
        return "plain pickle with only plain values"
    if fmt == "numpy":
        return "numpy array without pickled objects"
    return "checked"


def scan_file(path: "os.PathLike[str] | str", source=None) -> ScanResult:
    """Scan one file. Never raises for bad input: problems become the verdict.

    `source` (formats.source.ByteSource, e.g. an S3 object): read in place by range requests;
    then only the structure and the pickle records are fetched, and the CRCs of tensor storage
    records are not checked (that would read the whole object; they hold no code)."""
    path = os.fspath(path)
    scan = _Scan(path, source)
    try:
        scan.format = detect_format(path, source)
        _SCANNERS.get(scan.format, _scan_unknown)(scan)
    except SdtkError as e:
        scan.add_error(e)
    except (OSError, MemoryError, ValueError) as e:  # pragma: no cover - defensive
        scan.add(UNREADABLE, f"cannot read: {e}")
    return scan.result()


def _mapped(path: str, source=None):
    if source is not None:
        return source.buffer(), source.size
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def _scan_safetensors(scan: _Scan) -> None:
    from sdtk.formats.safetensors import read_safetensors

    with read_safetensors(scan.path, source=scan.source) as cat:
        scan.tensors = len(cat)


def _scan_gguf(scan: _Scan) -> None:
    # GGUF holds no code: a strict header parse (bounds, overlaps, types) is the whole check
    from sdtk.formats.gguf import read_gguf

    with read_gguf(scan.path) as cat:
        scan.tensors = len(cat)


def _scan_torchzip(scan: _Scan) -> None:
    from sdtk.formats.torchzip import read_torchzip, torchscript_records
    from sdtk.formats.zipread import fold_name, read_zip

    buf, size = _mapped(scan.path, scan.source)
    archive = None
    try:
        archive = read_zip(scan.path, buf, size)
        for issue in archive.issues:
            scan.add(UNSAFE if issue.kind == "unsafe" else UNREADABLE, issue.message)
        npz = bool(archive.entries) and all(fold_name(e.name).endswith(".npy") for e in archive.entries)
        if npz:
            scan.format = "numpy"
        script = torchscript_records(archive)
        if script:
            scan.add(UNSAFE, f"TorchScript archive ({script[0]!r}): it contains code that torch.load can run; refused")
        storage_prefix = _storage_prefix(archive)
        for e in archive.entries:
            folded = fold_name(e.name)
            try:
                head = archive.head(e, 8) if not e.encrypted else bytes(archive.raw(e)[:8])
            except SdtkError as err:
                scan.add_error(err)
                continue
            # np.load reads any member that starts with the .npy magic as an array, whatever its name
            if head.startswith(b"\x93NUMPY"):
                try:
                    _scan_npy_bytes(scan, archive.head(e, NPY_HEADER_LIMIT + 16) if not e.encrypted else archive.raw(e), e.name,
                                    body=lambda e=e: archive.read(e, verify=False, limit=PICKLE_SCAN_LIMIT))
                except SdtkError as err:
                    scan.add_error(err)
                continue
            is_pickle = folded.endswith(".pkl") or (
                not (storage_prefix and folded.startswith(storage_prefix)) and _looks_like_pickle(head))
            if not is_pickle:
                continue
            try:
                data = archive.read(e, verify=False, limit=PICKLE_SCAN_LIMIT) if not e.encrypted else bytes(archive.raw(e))
            except SdtkError as err:
                scan.add_error(err)
                continue
            end = scan.run_pickle(data, e.name, storages=True)
            if end is not None and end != len(data):
                scan.add(UNREADABLE, f"{len(data) - end} unexpected bytes after the end of {e.name}")
        for e in archive.entries:
            if scan.source is not None and storage_prefix and e.name.startswith(storage_prefix):
                continue  # in place: storages hold no code, and checking them reads the whole object
            if not e.encrypted and e.method in (0, 8) and not archive.verify_crc(e):
                scan.add(UNREADABLE, f"CRC mismatch in zip record {e.name!r} (corrupt or tampered with)")
        if scan.findings or npz:
            return
    finally:
        del archive
        buf.close()
    # Structure is clean: open it as the reader does (storages vs records, tensor bounds).
    with read_torchzip(scan.path, source=scan.source) as cat:
        scan.tensors = len(cat)


def _storage_prefix(archive) -> Optional[str]:
    from sdtk.formats.zipread import fold_name

    first = archive.entries[0].name if archive.entries else ""
    return fold_name(first.split("/", 1)[0] + "/data/") if "/" in first else None


def _looks_like_pickle(head: bytes) -> bool:
    """A record starting with a PROTO opcode (2..5): interpreted whatever its name (torch ignores
    records it does not know, but other loaders and tools may not)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _scan_legacy(scan: _Scan) -> None:
    from sdtk.formats.torchlegacy import read_torch_legacy

    buf, size = _mapped(scan.path, scan.source)
    try:
        pos, index = 0, 0
        while pos is not None and pos < size and index < 5:  # magic, protocol, sys_info, main, keys
            pos = scan.run_pickle(buf, f"pickle #{index + 1}", storages=(index == 3), start=pos)
            index += 1
        if scan.findings:
            return
        from sdtk.formats.torchlegacy import legacy_contents

        try:
            end = legacy_contents(scan.path, buf, size)[3]
        except SdtkError as e:
            scan.add_error(e)
            return
        if end < size:  # what torch never reads: scanned too (hidden pickles), and not "safe"
            before = len(scan.findings)
            _scan_stacked(scan, buf, size, end, what="trailing pickle")
            if not any(f.verdict == UNSAFE for f in scan.findings[before:]):
                del scan.findings[before:]
                scan.add(UNREADABLE, f"{size - end} bytes after the last storage that torch never reads "
                                     f"(a checkpoint torch wrote ends with its last storage)")
            return
    finally:
        buf.close()
    with read_torch_legacy(scan.path, source=scan.source) as cat:
        scan.tensors = len(cat)


def _scan_pickle(scan: _Scan) -> None:
    buf, size = _mapped(scan.path, scan.source)
    try:
        stop = _scan_stacked(scan, buf, size, 0)
    finally:
        buf.close()
    if stop is not None and not scan.findings:
        scan.add(UNREADABLE, f"{size - stop} bytes after the last pickle are not a pickle (pickle.load stops before "
                             f"them; a file that holds more than it says is not a model file)")
    scan.tensors = 0


def _scan_stacked(scan: _Scan, buf, size: int, pos: int, *, what: str = "pickle", storages: bool = False,
                  first: int = 1) -> Optional[int]:
    """Every pickle stacked in the data (payloads hide in the second one). Returns where the
    bytes stop being pickles when that is not the end (None when every byte was read)."""
    index = first - 1
    while pos < size:
        index += 1
        before = len(scan.findings)
        end = scan.run_pickle(buf, f"{what} #{index}", start=pos, storages=storages)
        if end is None:
            failed = scan.findings[before:]
            if index > first and all(f.verdict == UNREADABLE for f in failed):
                del scan.findings[before:]  # trailing bytes that are not a pickle: pickle.load never reads them
                return pos
            return None
        pos = end
    return None


def _scan_npy_bytes(scan: _Scan, data, what: str, body=None) -> None:
    """`data`: the array's bytes (or at least its header, with `body()` giving all of them)."""
    header, start = _npy_header(bytes(data[:NPY_HEADER_LIMIT + 16]), what, scan.path)
    if not _npy_has_objects(header["descr"], what, scan.path):
        return
    before = len(scan.findings)
    try:
        whole = body() if body is not None else data
        scan.run_pickle(bytes(whole[start:]), f"{what} object array")
    except SdtkError as e:
        scan.add_error(e)
    if not any(f.verdict == UNSAFE for f in scan.findings[before:]):
        del scan.findings[before:]
        scan.add(UNSAFE, f"{what}: numpy object array; np.load(allow_pickle=True) would run its pickle")


def _scan_numpy(scan: _Scan) -> None:
    buf, size = _mapped(scan.path, scan.source)
    try:
        _scan_npy_bytes(scan, buf, os.path.basename(scan.path))
    finally:
        buf.close()


def _scan_tar(scan: _Scan) -> None:
    """torch.load reads the file as a tar archive: unsafe by format. Its members are interpreted
    to name what they would run, and the same bytes are scanned as whatever else they are (a
    polyglot: pickle.load and np.load read the other reading)."""
    from sdtk.formats.torchtar import torch_members

    for name, data in torch_members(scan.path, limit=MAX_TAR_MEMBER_SCAN):
        before = len(scan.findings)
        _scan_stacked(scan, data, len(data), 0, what=f"tar member {name!r}", storages=True)
        scan.findings[before:] = [f for f in scan.findings[before:] if f.verdict == UNSAFE]
    scan.add(UNSAFE, "torch.load reads this file as a torch tar archive (its first 512 bytes are a tar header) and "
                     "unpickles its members without restrictions; refused")
    other = detect_format(scan.path, as_torch_loads=False)
    if other != "torch-tar" and other in _SCANNERS:
        before = len(scan.findings)
        _SCANNERS[other](scan)
        scan.findings[before:] = [f for f in scan.findings[before:] if f.verdict == UNSAFE]
        scan.format = "torch-tar"


def _scan_unknown(scan: _Scan) -> None:
    if scan.format == "unknown":
        # Protocol-0 pickles may begin with almost any opcode: interpret it anyway, so a payload
        # is reported as unsafe rather than merely unreadable.
        buf, size = _mapped(scan.path, scan.source)
        try:
            before = len(scan.findings)
            _scan_stacked(scan, buf, size, 0)
            if any(f.verdict == UNSAFE for f in scan.findings[before:]):
                scan.format = "pickle"
                return
            del scan.findings[before:]
        finally:
            buf.close()
    scan.add(UNREADABLE, "not a model file sdtk knows (not safetensors, not a PyTorch checkpoint)")


_SCANNERS = {
    "safetensors": _scan_safetensors,
    "torch-zip": _scan_torchzip,
    "torch-legacy": _scan_legacy,
    "pickle": _scan_pickle,
    "numpy": _scan_numpy,
    "torch-tar": _scan_tar,
    "gguf": _scan_gguf,
}


def iter_model_files(paths: Iterable["os.PathLike[str] | str"]) -> Iterator[str]:
    """Explicit files as given; folders walked recursively for model-file extensions, sorted."""
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in MODEL_EXTENSIONS:
                        yield os.path.join(root, name)
        else:
            yield p


def scan_paths(paths: Iterable["os.PathLike[str] | str"]) -> List[ScanResult]:
    return [scan_file(p) for p in iter_model_files(paths)]


def exit_code(results: Iterable[ScanResult]) -> int:
    """0 all safe, 1 any unsafe, 2 any unreadable (and none unsafe)."""
    verdicts = {r.verdict for r in results}
    if UNSAFE in verdicts:
        return 1
    if UNREADABLE in verdicts:
        return 2
    return 0
