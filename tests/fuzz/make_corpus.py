#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses into tests/fuzz/corpus/<harness>/.

Valid inputs of each format (small) and a few malformed ones; the input layout of each harness is
described at the top of its fuzz_<harness>.cpp. Reproducers of findings are added to the same
directories by hand (named crash-*, leak-*, timeout-*) and are not touched by this script.
Run from anywhere: python3 tests/fuzz/make_corpus.py
"""
import gzip
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "..", "configs")


def put(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def gz(data):
    return gzip.compress(data, mtime=0)


# ---- IDX: u16 LE length of the images file, images file, labels file ----
def idx_images(count, rows=28, cols=28, magic=0x803):
    pixels = bytes((i * 7 + 3) % 256 for i in range(count * rows * cols))
    return struct.pack(">IIII", magic, count, rows, cols) + pixels


def idx_labels(labels, magic=0x801):
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def idx_input(images, labels):
    return struct.pack("<H", len(images)) + images + labels


img1, lab1 = idx_images(1), idx_labels([7])
img2, lab2 = idx_images(2), idx_labels([3, 9])
put("idx", "plain-1", idx_input(img1, lab1))
put("idx", "plain-2", idx_input(img2, lab2))
put("idx", "gzip-images", idx_input(gz(img2), lab2))
put("idx", "gzip-both", idx_input(gz(img1), gz(lab1)))
put("idx", "gzip-two-members", idx_input(gz(img1[:400]) + gz(img1[400:]), lab1))
put("idx", "bad-label", idx_input(img1, idx_labels([10])))
put("idx", "count-mismatch", idx_input(img2, lab1))
put("idx", "swapped-magic", idx_input(lab1, img1))
put("idx", "truncated-pixels", idx_input(img1[:-5], lab1))
put("idx", "extra-byte", idx_input(img1 + b"\0", lab1))
put("idx", "truncated-gzip", idx_input(gz(img1)[:-4], lab1))
put("idx", "wrong-size", idx_input(idx_images(1, 2, 2), lab1))
put("idx", "zero-count", idx_input(idx_images(0), idx_labels([])))

# ---- CIFAR-10: one batch file ----
def cifar(labels):
    out = b""
    for r, label in enumerate(labels):
        out += bytes([label]) + bytes((i + r) % 256 for i in range(3072))
    return out


put("cifar10", "one-record", cifar([4]))
put("cifar10", "gzip-two-records", gz(cifar([0, 9])))
put("cifar10", "truncated", cifar([1])[:-1])
put("cifar10", "bad-label", cifar([10]))
put("cifar10", "empty", b"")
put("cifar10", "gzip-trailing-garbage", gz(cifar([2])) + b"xyz")
put("cifar10", "gzip-bad-crc", gz(cifar([2]))[:-8] + b"\0\0\0\0" + gz(cifar([2]))[-4:])

# ---- config: YAML text, "#set KEY=VALUE" lines are overrides ----
for name in sorted(os.listdir(CONFIGS)):
    with open(os.path.join(CONFIGS, name), "rb") as f:
        put("config", name, f.read())
put("config", "overrides", b"model:\n  name: mlp\n#set train.epochs=3\n#set schedule.milestones=[0.25,0.5]\n"
    b"#set data={name: synthetic}\n")
put("config", "empty", b"")
put("config", "unknown-key", b"train:\n  epoch: 3\n")
put("config", "wrong-type", b"train:\n  epochs: [1, 2]\n")
put("config", "duplicate-key", b"train:\n  epochs: 3\n  epochs: 4\n")
put("config", "alias", b"a: &x {epochs: 3}\ntrain: *x\n")
put("config", "tab", b"train:\n\tepochs: 3\n")
put("config", "huge-int", b"train:\n  batch_size: 99999999999999999999999\n")
put("config", "nan", b"optim:\n  lr: .nan\n")
put("config", "bad-override", b"#set train.epochs\n#set nosuch.key=1\n")
put("config", "warmup", b"train:\n  epochs: 2\nschedule:\n  warmup_epochs: 2\n")

# ---- checkpoint: flag byte (bit 0: the harness fixes size and CRC), then the file ----
def checkpoint(records, version=1):
    payload = b""
    for name, data in records:
        payload += struct.pack("<I", len(name)) + name + struct.pack("<Q", len(data)) + data
    header = b"I4CK" + struct.pack("<IQI", version, len(payload), zlib.crc32(payload))
    return header + payload


records = [
    (b"config_yaml", b"model:\n  name: mlp\n"),
    (b"model_signature", b"mlp;10;fc1.w"),
    (b"optimizer_steps", struct.pack("<q", 42)),
    (b"values", struct.pack("<4f", 0.5, -1.0, 2.0, 0.0)),
]
good = checkpoint(records)
put("checkpoint", "valid", b"\0" + good)
put("checkpoint", "valid-fixup", b"\1" + good)
put("checkpoint", "empty-table", b"\0" + checkpoint([]))
put("checkpoint", "bad-magic", b"\0" + b"XXXX" + good[4:])
put("checkpoint", "version-2", b"\0" + checkpoint(records, version=2))
put("checkpoint", "truncated", b"\0" + good[:-3])
put("checkpoint", "bad-crc", b"\0" + good[:16] + b"\0\0\0\0" + good[20:])
put("checkpoint", "odd-values", b"\1" + checkpoint([(b"values", b"\0\0\0")]))
put("checkpoint", "wrong-step-size", b"\1" + checkpoint([(b"optimizer_steps", b"\0")]))
put("checkpoint", "short-table", b"\1" + good[:20] + struct.pack("<I", 1000) + b"ab")

# ---- quantize: a command line, newline, raw float32 input ----
def floats(values):
    return struct.pack("<%df" % len(values), *values)


ramp = floats([((i * 37) % 17 - 8) / 4.0 for i in range(32)])
put("quantize", "lbt", b"--bits 4 --policy lbt --count 8\n" + ramp)
put("quantize", "fixed-blocks", b"--policy fixed --gamma 0.5 --rounding nearest --block-size 4 -o o --codes c\n" + ramp)
put("quantize", "minmax-2bit", b"--bits 2 --policy minmax\n" + ramp)
put("quantize", "mse", b"--policy mse --count 16 --seed 7\n" + ramp)
put("quantize", "dsgc", b"--policy dsgc --bits 8 --no-calibrate\n" + ramp)
put("quantize", "nonfinite", b"--count 4\n" + floats([1.0, float("nan"), float("inf"), -2.0]))
put("quantize", "fail-on-nonfinite", b"--fail-on-nonfinite\n" + floats([float("nan"), 1.0]))
put("quantize", "zeros", b"--count 2\n" + floats([0.0] * 4))
put("quantize", "ragged", b"--count 3\n" + ramp)
put("quantize", "not-float32", b"\n" + b"abcde")
put("quantize", "empty-input", b"--bits 4\n")
put("quantize", "bad-bits", b"--bits 9\n" + ramp)
put("quantize", "gamma-without-fixed", b"--gamma 0.5\n" + ramp)
put("quantize", "bad-option", b"--nosuch\n" + ramp)
