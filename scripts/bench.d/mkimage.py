#!/usr/bin/env python3
"""Builds an OCI image layout for the benchmark, from scratch, with the standard library only.

Usage: mkimage.py LAYOUT_DIR TAG=SIZE[,SIZE...][@SEED] [TAG=...]

Each TAG becomes a single-platform linux/amd64 image whose layers are tar archives holding one
file of SIZE pseudo-random bytes (sizes in bytes, or with a K/M/G suffix meaning KiB/MiB/GiB),
wrapped in gzip framing with *stored* (uncompressed) deflate blocks: valid gzip that costs no
compression CPU, the same approach as tests/common/images.rs. Prints a JSON object describing
every image (manifest digest, config digest, layer digests and sizes) on stdout.
"""
import hashlib
import json
import os
import struct
import sys
import zlib

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
CHUNK = 1 << 20
STORED_MAX = 65535


def parse_size(text):
    text = text.strip().upper()
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


class StoredGzip:
    """gzip of stored deflate blocks, hashing both the framed stream and the raw tar."""

    def __init__(self, path):
        self.file = open(path, "wb")
        self.crc = 0
        self.raw_len = 0
        self.raw_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.blob_len = 0
        self.emit(bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 255]))

    def emit(self, data):
        self.blob_hash.update(data)
        self.blob_len += len(data)
        self.file.write(data)

    def write(self, data):
        self.raw_hash.update(data)
        self.raw_len += len(data)
        self.crc = zlib.crc32(data, self.crc)
        view = memoryview(data)
        for start in range(0, len(view), STORED_MAX):
            piece = view[start:start + STORED_MAX]
            self.emit(struct.pack("<BHH", 0, len(piece), 0xFFFF ^ len(piece)))
            self.emit(piece)

    def finish(self):
        # An empty final stored block ends the deflate stream.
        self.emit(struct.pack("<BHH", 1, 0, 0xFFFF))
        self.emit(struct.pack("<II", self.crc & 0xFFFFFFFF, self.raw_len & 0xFFFFFFFF))
        self.file.close()
        return (
            "sha256:" + self.blob_hash.hexdigest(),
            self.blob_len,
            "sha256:" + self.raw_hash.hexdigest(),
        )


def tar_header(name, size):
    header = bytearray(512)
    header[: len(name)] = name.encode()

    def octal(start, length, value):
        text = ("%0*o" % (length - 1, value)).encode() + b"\0"
        header[start:start + length] = text

    octal(100, 8, 0o644)
    octal(108, 8, 0)
    octal(116, 8, 0)
    octal(124, 12, size)
    octal(136, 12, 1_700_000_000)
    header[156] = ord("0")
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b"        "
    checksum = sum(header)
    header[148:155] = ("%06o" % checksum).encode() + b"\0"
    header[155] = ord(" ")
    return bytes(header)


def put_blob(layout, data):
    hexdigest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", hexdigest), "wb") as f:
        f.write(data)
    return "sha256:" + hexdigest


def layer(layout, name, size):
    tmp = os.path.join(layout, "blobs", "sha256", ".building")
    out = StoredGzip(tmp)
    out.write(tar_header("data/" + name, size))
    remaining = size
    while remaining > 0:
        n = min(remaining, CHUNK)
        out.write(os.urandom(n))
        remaining -= n
    out.write(bytes((512 - size % 512) % 512 + 1024))
    digest, length, diff_id = out.finish()
    os.rename(tmp, os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1]))
    return digest, length, diff_id


def image(layout, tag, sizes):
    layers, diff_ids = [], []
    for i, size in enumerate(sizes):
        digest, length, diff_id = layer(layout, "%s-layer-%d.bin" % (tag, i), size)
        layers.append({"mediaType": LAYER_GZIP, "digest": digest, "size": length})
        diff_ids.append(diff_id)
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, separators=(",", ":")).encode()
    config_digest = put_blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layers,
    }, separators=(",", ":")).encode()
    manifest_digest = put_blob(layout, manifest)
    return {
        "tag": tag,
        "manifest_digest": manifest_digest,
        "manifest_size": len(manifest),
        "config_digest": config_digest,
        "config_size": len(config),
        "layers": [{"digest": l["digest"], "size": l["size"]} for l in layers],
    }


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    layout = sys.argv[1]
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    images, tagged = {}, []
    for spec in sys.argv[2:]:
        tag, sizes = spec.split("=", 1)
        built = image(layout, tag, [parse_size(s) for s in sizes.split(",")])
        images[tag] = built
        tagged.append({
            "mediaType": OCI_MANIFEST,
            "digest": built["manifest_digest"],
            "size": built["manifest_size"],
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": tagged}, f)
    json.dump(images, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
