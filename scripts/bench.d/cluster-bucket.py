#!/usr/bin/env python3
"""Which blobs of an image an object-tier bucket holds, from an S3 ListObjectsV2 answer.

Usage: cluster-bucket.py IMAGES_JSON TAG < LIST_XML
Prints a JSON object: objects (keys listed), bytes (their total size), missing (blobs of TAG, its
config and layers, with no object of the blob's size whose key contains the blob's hex digest).
Matching on the digest and the size works for any content-addressed layout: gantry's keys and
distribution's `docker/registry/v2/blobs/sha256/ab/<hex>/data` both name the digest, while
distribution's repository links (`.../_layers/sha256/<hex>/link`) are 71-byte files, not the blob.
"""
import json
import sys
import xml.etree.ElementTree as ET


def main():
    image = json.load(open(sys.argv[1]))[sys.argv[2]]
    blobs = [(image["config_digest"], image["config_size"])]
    blobs += [(layer["digest"], layer["size"]) for layer in image["layers"]]
    objects = []
    try:
        root = ET.fromstring(sys.stdin.read())
    except ET.ParseError:
        root = None
    if root is not None:
        for element in root.iter():
            if element.tag.rsplit("}", 1)[-1] != "Contents":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in element}
            objects.append((fields.get("Key", ""), int(fields.get("Size", "0") or 0)))
    missing = 0
    for digest, size in blobs:
        hex_digest = digest.split(":", 1)[-1]
        if not any(hex_digest in key and length == size for key, length in objects):
            missing += 1
    json.dump({"objects": len(objects), "bytes": sum(length for _, length in objects), "missing": missing},
              sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
