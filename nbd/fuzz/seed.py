#!/usr/bin/env python3
"""Writes the seed corpus for the `reply` target (see README.md)."""
import hashlib, os, struct

SIMPLE, STRUCT = 0x67446698, 0x668E33EF
def simple(h, err=0, data=b""): return struct.pack(">IIQ", SIMPLE, err, h) + data
def chunk(h, kind, payload, done=True): return struct.pack(">IHHQI", STRUCT, 1 if done else 0, kind, h, len(payload)) + payload

seeds = {
    # Simple replies: READ data, WRITE ok, FLUSH ENOSPC, TRIM ok.
    "simple": bytes([0]) + simple(1, 0, bytes(range(256)) * 16) + simple(2) + simple(3, 28) + simple(6),
    # Structured READ in a hole and two data chunks, out of order, then NONE.
    "structured_read": bytes([3]) + chunk(5, 2, struct.pack(">QI", 1 << 20, 32768), False)
        + chunk(1, 1, struct.pack(">Q", 0) + b"\xab" * 4096)
        + chunk(5, 1, struct.pack(">Q", (1 << 20) + 32768) + b"\xcd" * 32768, False)
        + chunk(5, 0, b""),
    # BLOCK_STATUS with three extents (hole+zero, data, hole).
    "block_status": bytes([3]) + chunk(4, 5, struct.pack(">IIIIIII", 1, 65536, 3, 4096, 0, 983040, 3)),
    # Errors: ERROR_OFFSET on a READ, ERROR on a WRITE, simple on a FLUSH.
    "errors": bytes([3]) + chunk(1, 0x8002, struct.pack(">IH", 5, 3) + b"EIO" + struct.pack(">Q", 512))
        + chunk(2, 0x8001, struct.pack(">IH", 28, 0)) + simple(3),
    # Handshake shapes: option reply header, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT.
    "option_reply": bytes([0]) + struct.pack(">QIII", 0x3E889045565A9, 7, 3, 14),
    "info_block_size": bytes([0]) + struct.pack(">HIII", 3, 512, 4096, 33554432),
    "info_export": bytes([0]) + struct.pack(">HQH", 0, 1 << 30, 0x0DED),
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "reply")
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)
    print(name, len(data))
