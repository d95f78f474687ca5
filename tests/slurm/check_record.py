"""Checks that moesim run records are finished runs of the expected world size.

usage: check_record.py --world-size N [--train-iters N] RUN.h5 [RUN.h5 ...]

Prints one line per record; exits 1 naming every record that is not complete,
has another world size or number of steps, or stopped before its last step.
"""
import argparse
import sys

import h5py


def problems(path, world_size, train_iters):
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as e:
        return [f"cannot open: {e}"]
    found = []
    if attrs.get("status") != "complete":
        found.append(f"status is {attrs.get('status')!r}, not 'complete'")
    if attrs.get("world_size") != world_size:
        found.append(f"world_size is {attrs.get('world_size')!r}, not {world_size}")
    if attrs.get("steps_done") != attrs.get("config.train_iters"):
        found.append(f"steps_done {attrs.get('steps_done')!r} != train_iters {attrs.get('config.train_iters')!r}")
    if train_iters is not None and attrs.get("config.train_iters") != train_iters:
        found.append(f"train_iters is {attrs.get('config.train_iters')!r}, not {train_iters}")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--train-iters", type=int)
    parser.add_argument("records", nargs="+")
    args = parser.parse_args()
    failed = False
    for path in args.records:
        found = problems(path, args.world_size, args.train_iters)
        if found:
            failed = True
            print(f"check_record: {path}: " + "; ".join(found))
        else:
            print(f"check_record: {path}: complete, world_size {args.world_size}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
