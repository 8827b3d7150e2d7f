#!/usr/bin/env python3
"""List the tensors of sherl runs' weights.safetensors, layer indices folded.

Usage: pipelines/list-weights.py RUN_DIR [RUN_DIR ...]

Standard library only (reads the safetensors header: an 8-byte little-endian
length, then a JSON object name -> {dtype, shape, data_offsets}).
"""
import json
import re
import struct
import sys


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            sys.exit(f"{path}: header of {n} bytes: not a safetensors file?")
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def main(runs):
    if not runs:
        sys.exit(__doc__)
    for run in runs:
        h = header(f"{run}/weights.safetensors")
        groups = {}
        for name in sorted(h):
            key = re.sub(r"\.(\d+)\.", ".{i}.", name)
            groups.setdefault(key, []).append(name)
        print(f"{run}: {len(h)} tensors")
        for key, names in groups.items():
            t = h[names[0]]
            idx = ""
            if "{i}" in key:
                found = sorted({int(m) for n in names for m in re.findall(r"\.(\d+)\.", n)})
                idx = f"  i in {found[0]}..={found[-1]}" if found == list(range(found[0], found[-1] + 1)) else f"  i in {found}"
            print(f"  {key}  {t['shape']}  {t['dtype']}{idx}")


if __name__ == "__main__":
    main(sys.argv[1:])
