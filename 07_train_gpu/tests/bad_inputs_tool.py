#!/usr/bin/env python3
"""Helpers of bad_inputs.sh (standard library only): make hostile variants of the files the programs read.

  songs OUT                          a small deterministic lyrics file (80 songs, ~13 KB) for `prepare --lyrics`
  fill FILE TENSOR VALUE [COUNT]     overwrite the first COUNT (default: all) F32 values of TENSOR with VALUE
                                     (a float: nan, inf, -inf, 3e38, -1 ...); TENSOR re:REGEX: every match
  header FILE                        print the header JSON of a safetensors file
  set-entry FILE TENSOR KEY RAW      set header[TENSOR][KEY] to the raw JSON text RAW (e.g. '[0, 99999999]')
  drop FILE TENSOR                   remove TENSOR from the header (its bytes stay: a hole in the data)
  remove FILE TENSOR                 remove TENSOR and its bytes (the other offsets shifted): a clean file without it
  append FILE TENSOR                 append a real 1-element F32 tensor TENSOR (value 0.5) at the end of the data
  add FILE TENSOR RAW                add TENSOR with the raw JSON entry RAW
  offsets FILE TENSOR HOW            damage TENSOR's data_offsets: past-eof (end 1e6 bytes past the data), reversed
                                     (end, begin), wrap (begin 2^64-1: end - begin wraps to the right byte count),
                                     overlap:OTHER (the bytes of OTHER), extra (a new TENSOR of 1 F32 past the data)
  header-len FILE N                  rewrite the 8-byte header length as N (the header bytes stay)
  finite FILE...                     exit 1 (naming the tensor) when any F32 value is NaN or Inf, else 0
  json-set FILE PATH RAW             set a.b.c of a JSON file to the raw JSON text RAW (big ints, 1e400 kept as typed)
  json-del FILE PATH                 remove a.b.c of a JSON file
"""
import json
import math
import re
import struct
import sys


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header, body, raw=None):
    """raw: {placeholder string: raw JSON text} substituted into the dumped header."""
    text = json.dumps(header, separators=(",", ":"))
    for k, v in (raw or {}).items():
        text = text.replace(json.dumps(k), v)
    h = text.encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + body)


def cmd_songs(out):
    # a fixed word list and arithmetic (no random module: the same file on every Python)
    words = ("love night river shine heart road home rain song light morning star wind fire water stone bird sky "
             "dream tears dance golden silver winter summer autumn spring shadow whisper thunder ocean mountain "
             "valley garden flower window door street city country lonely tender wild free").split()
    songs = []
    for i in range(80):
        lines = []
        for l in range(3 + (i * 7 + 3) % 4):
            n = 4 + (i + l * 5) % 5
            line = " ".join(words[(i * 13 + l * 7 + w * w * 5 + w * i) % len(words)] for w in range(n))
            lines.append(line[0].upper() + line[1:])
        songs.append("\n".join(lines))
    with open(out, "w") as f:
        f.write("\n%\n".join(songs) + "\n")  # '%' ends a song (07 README, "Your own lyrics")


def cmd_fill(path, tensor, value, count=None):
    header, body = read_st(path)
    # re:REGEX names every tensor it matches (e.g. re:embed_tokens: the main and the MTP copies of a shared tensor)
    names = [k for k in header if k != "__metadata__" and re.search(tensor[3:], k)] if tensor.startswith("re:") \
        else [tensor]
    if not names:
        raise SystemExit("fill: no tensor matches " + tensor)
    body = bytearray(body)
    for name in names:
        e = header[name]
        assert e["dtype"] == "F32", e
        b0, b1 = e["data_offsets"]
        n = (b1 - b0) // 4 if count is None else int(count)
        body[b0:b0 + 4 * n] = struct.pack("<%df" % n, *([float(value)] * n))
    write_st(path, header, bytes(body))


def cmd_set_entry(path, tensor, key, raw):
    header, body = read_st(path)
    header[tensor][key] = "@@RAW@@"
    write_st(path, header, body, {"@@RAW@@": raw})


def cmd_drop(path, tensor):
    header, body = read_st(path)
    del header[tensor]
    write_st(path, header, body)


def cmd_remove(path, tensor):
    header, body = read_st(path)
    b0, b1 = header.pop(tensor)["data_offsets"]
    for name, e in header.items():
        if name != "__metadata__" and e["data_offsets"][0] >= b1:
            e["data_offsets"] = [e["data_offsets"][0] - (b1 - b0), e["data_offsets"][1] - (b1 - b0)]
    write_st(path, header, body[:b0] + body[b1:])


def cmd_append(path, tensor):
    header, body = read_st(path)
    header[tensor] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
    write_st(path, header, body + struct.pack("<f", 0.5))


def cmd_offsets(path, tensor, how):
    header, body = read_st(path)
    if how == "extra":
        header[tensor] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
    else:
        e = header[tensor]
        b0, b1 = e["data_offsets"]
        if how == "past-eof":
            e["data_offsets"] = [b0, len(body) + 1000000]
        elif how == "reversed":
            e["data_offsets"] = [b1, b0]
        elif how == "wrap":
            e["data_offsets"] = [2**64 - 1, b1 - b0 - 1]
        elif how.startswith("overlap:"):
            o0 = header[how[len("overlap:"):]]["data_offsets"][0]
            e["data_offsets"] = [o0, o0 + b1 - b0]
        else:
            raise SystemExit("offsets: unknown HOW " + how)
    write_st(path, header, body)


def cmd_add(path, tensor, raw):
    header, body = read_st(path)
    header[tensor] = "@@RAW@@"
    write_st(path, header, body, {"@@RAW@@": raw})


def cmd_header_len(path, n):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", int(n)) + data[8:])


def cmd_finite(*paths):
    for path in paths:
        header, body = read_st(path)
        for name, e in header.items():
            if name == "__metadata__" or e.get("dtype") != "F32":
                continue
            b0, b1 = e["data_offsets"]
            vals = struct.unpack("<%df" % ((b1 - b0) // 4), body[b0:b1])
            bad = sum(1 for v in vals if not math.isfinite(v))
            if bad:
                print(f"{path}: {name} holds {bad} non-finite values")
                return 1
    return 0


def walk(j, path):
    keys = path.split(".")
    for k in keys[:-1]:
        j = j[int(k)] if isinstance(j, list) else j[k]
    return j, keys[-1]


def cmd_json_set(path, key, raw):
    with open(path) as f:
        j = json.load(f)
    parent, last = walk(j, key)
    parent[last] = "@@RAW@@"
    text = json.dumps(j, indent=2).replace('"@@RAW@@"', raw)
    with open(path, "w") as f:
        f.write(text + "\n")


def cmd_json_del(path, key):
    with open(path) as f:
        j = json.load(f)
    parent, last = walk(j, key)
    del parent[last]
    with open(path, "w") as f:
        f.write(json.dumps(j, indent=2) + "\n")


def main(argv):
    cmds = {"songs": cmd_songs, "fill": cmd_fill, "header": lambda p: print(json.dumps(read_st(p)[0], indent=1)),
            "set-entry": cmd_set_entry, "drop": cmd_drop, "remove": cmd_remove, "append": cmd_append, "offsets": cmd_offsets, "add": cmd_add, "header-len": cmd_header_len,
            "finite": cmd_finite, "json-set": cmd_json_set, "json-del": cmd_json_del}
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 64
    return cmds[argv[1]](*argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
