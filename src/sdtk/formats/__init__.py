"""Readers for every model file format; the format is detected from the content, never the name."""
from __future__ import annotations

import os

from sdtk.errors import FormatError, UnsafeFileError, UnsupportedFormatError
from sdtk.fileio import open_input
from sdtk.formats.catalogue import Catalogue

# Magic numbers. Sources: PKWARE APPNOTE (zip local header), torch/serialization.py
# (legacy MAGIC_NUMBER 0x1950a86a20f9469cfc6c as a pickled long), POSIX tar (`ustar` at 257),
# GGUF spec ("GGUF").
ZIP_MAGIC = b"PK\x03\x04"
ZIP_EMPTY_MAGIC = b"PK\x05\x06"
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
GGUF_MAGIC = b"GGUF"


def detect_format(path: "os.PathLike[str] | str", source=None, *, as_torch_loads: bool = True) -> str:
    """One of: safetensors, torch-zip, torch-legacy, pickle, torch-tar, gguf, numpy, unknown.

    As torch.load decides (`as_torch_loads`): a zip local header first, then a tar header (even
    an old V7 one in a file that is also a pickle or a safetensors file: torch reads it as a tar);
    `as_torch_loads=False` gives what the same bytes are otherwise (scan checks both readings).
    `source` (formats.source.ByteSource): read the bytes from it instead of opening `path`."""
    from sdtk.formats.safetensors import looks_like_safetensors

    with open_input(path) if source is None else source.open() as f:
        head = f.read(512)
    if not head:
        raise FormatError(path, "empty file")
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if as_torch_loads:
        from sdtk.formats.torchtar import torch_reads_as_tar

        if torch_reads_as_tar(path, head):
            return "torch-tar"
    if head.startswith(ZIP_EMPTY_MAGIC):
        return "torch-zip"
    if head.startswith(LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if len(head) >= 262 and head[257:262] == b"ustar" and as_torch_loads:
        return "torch-tar"
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if looks_like_safetensors(head):
        return "safetensors"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return "pickle"
    return "unknown"


def open_model(path: "os.PathLike[str] | str", source=None) -> Catalogue:
    """Open any supported model file (or a diffusers folder) as a lazy Catalogue (nothing is executed,
    nothing loaded). `source` (formats.source.ByteSource, e.g. an S3 object): read it in place
    with range requests."""
    path = os.fspath(path)
    if source is None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        from sdtk.formats.diffusers import read_diffusers_folder

        return read_diffusers_folder(path)  # a diffusers folder, under single-file names
    kind = detect_format(path, source)
    if kind == "safetensors":
        from sdtk.formats.safetensors import read_safetensors

        return read_safetensors(path, source=source)
    if kind == "torch-zip":
        from sdtk.formats.torchzip import read_torchzip

        return read_torchzip(path, source=source)
    if kind == "torch-legacy":
        from sdtk.formats.torchlegacy import read_torch_legacy

        return read_torch_legacy(path, source=source)
    if kind == "pickle":
        from sdtk.formats.torchlegacy import read_plain_pickle

        return read_plain_pickle(path, source=source)
    if kind == "torch-tar":
        raise UnsafeFileError(path, "torch.load reads this file as a torch tar archive (its first 512 bytes are a tar "
                                    "header) and unpickles its members without restrictions; refused")
    if kind == "gguf":
        from sdtk.formats.gguf import read_gguf

        return read_gguf(path)
    if kind == "numpy":
        from sdtk.formats.npyheader import NPY_HEADER_LIMIT, refuse_npy

        with open_input(path) as f:
            refuse_npy(path, f.read(NPY_HEADER_LIMIT + 16))
    from sdtk.formats.torchlegacy import refuse_hidden_pickle_payload

    refuse_hidden_pickle_payload(path, source=source)  # a protocol-0 pickle can start with almost any byte
    raise FormatError(path, "not a model file sdtk knows (not safetensors, not a PyTorch checkpoint)")


__all__ = ["Catalogue", "detect_format", "open_model"]
