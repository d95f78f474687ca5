#!/usr/bin/env python3
"""Writes a moesim token file (format in include/moesim/data.h).

Input is either integers separated by whitespace (tokens produced by a
tokenizer elsewhere; --vocab-size required) or, with --bytes, any file read
byte by byte (vocab 256). Also reads a token file back with --dump.

  tools/make_tokens.py --vocab-size 50257 ids.txt -o corpus.tok
  tools/make_tokens.py --bytes book.txt -o book.tok
  tools/make_tokens.py --dump corpus.tok
"""
import argparse
import struct
import sys
from array import array

MAGIC = b"MOESIMTK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, vocab_size, num_tokens, reserved


def write_tokens(path, tokens, vocab_size):
    if not 1 <= vocab_size <= 65536:
        sys.exit(f"--vocab-size {vocab_size} is outside 1..65536")
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab_size:
            sys.exit(f"token {t} at index {i} is not in 0..{vocab_size - 1}; raise --vocab-size")
    data = array("H", tokens)
    if sys.byteorder != "little":
        data.byteswap()
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, vocab_size, len(data), 0))
        data.tofile(f)


def read_tokens(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        sys.exit(f"{path} is not a moesim token file (expected magic MOESIMTK)")
    magic, version, vocab, n, _ = HEADER.unpack_from(raw)
    if version != VERSION:
        sys.exit(f"{path}: version {version}, expected {VERSION}")
    if len(raw) != HEADER.size + 2 * n:
        sys.exit(f"{path}: expected {HEADER.size + 2 * n} bytes, found {len(raw)}")
    data = array("H")
    data.frombytes(raw[HEADER.size:])
    if sys.byteorder != "little":
        data.byteswap()
    return vocab, data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="integer token list, a file read as bytes (--bytes), or a .tok file (--dump)")
    p.add_argument("-o", "--output", help="token file to write")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of the integer tokens")
    p.add_argument("--bytes", action="store_true", help="read the input as raw bytes (vocab 256)")
    p.add_argument("--dump", action="store_true", help="print the header and first tokens of a token file")
    a = p.parse_args()
    if a.dump:
        vocab, data = read_tokens(a.input)
        print(f"vocab_size {vocab}, num_tokens {len(data)}, first {list(data[:16])}")
        return
    if not a.output:
        p.error("-o/--output is required")
    if a.bytes:
        with open(a.input, "rb") as f:
            write_tokens(a.output, list(f.read()), 256)
    else:
        if a.vocab_size is None:
            p.error("--vocab-size is required for integer input")
        with open(a.input) as f:
            write_tokens(a.output, [int(w) for w in f.read().split()], a.vocab_size)


if __name__ == "__main__":
    main()
