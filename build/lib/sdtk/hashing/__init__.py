"""Hashes of model files: the six the ecosystem prints (one read of the file) and sdtk's content hash.

- `hash_file(path) -> FileHashes`: SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 in one read.
- `FileHashes.formatted(style)`: exactly as Civitai ("civitai", upper case) or A1111 ("a1111",
  lower case) print them; definitions in docs/hash.md.
- `content_hash(catalogue) -> str`: a hash of the tensors themselves (names, dtypes, shapes, bytes in
  a canonical order), equal for the same weights in any container or after a metadata edit.
"""
from sdtk.hashing.content import CONTENT_HASH_VERSION, content_hash, content_record, tensor_digest
from sdtk.hashing.filehash import FileHashes, HashOptions, hash_bytes, hash_file
from sdtk.hashing.styles import HASH_KEYS, STYLES, format_hashes

__all__ = [
    "CONTENT_HASH_VERSION", "FileHashes", "HASH_KEYS", "HashOptions", "STYLES", "content_hash",
    "content_record", "format_hashes", "hash_bytes", "hash_file", "tensor_digest",
]
