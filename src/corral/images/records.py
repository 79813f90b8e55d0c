"""How chunks travel over HTTP, shared by the image routes (server) and the API client.

A batch is a stream of records ``id(32) | raw_len(u32) | comp_len(u32) | bytes``, each chunk
as it is stored (zstd). It lives apart from the routes so that a client (``corral image
import``, an agent) reads and writes batches without importing the server's web framework.
"""

from __future__ import annotations

import struct

from corral.errors import InvalidRequest

RECORD = struct.Struct(">32sII")
#: chunk ids per request, either way (the server refuses more)
MAX_BATCH = 1024
#: bytes of records per upload request (the server refuses a larger body with 413, so a
#: client cuts its batches at this size; one record is at most a chunk, 256 KiB, and a little)
MAX_UPLOAD_BYTES = 8 * 1024 * 1024

#: (chunk id, uncompressed length, compressed bytes)
Record = tuple[bytes, int, bytes]


def encode_records(records: list[Record]) -> bytes:
    return b"".join(RECORD.pack(cid, raw_len, len(comp)) + comp for cid, raw_len, comp in records)


def parse_records(data: bytes) -> list[Record]:
    out: list[Record] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < RECORD.size:
            raise InvalidRequest("truncated chunk stream", hint="retry the fetch")
        cid, raw_len, comp_len = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        if len(data) - pos < comp_len:
            raise InvalidRequest("truncated chunk stream", hint="retry the fetch")
        out.append((cid, raw_len, data[pos:pos + comp_len]))
        pos += comp_len
    return out
