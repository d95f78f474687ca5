"""Checks that moesim records of one training on different layouts are
bit-identical, and that each ran where it was meant to.

usage: compare_records.py REFERENCE.h5 OTHER.h5[:HOST,HOST,...] ...

Every dataset under /train, /eval, /routing and /specialization of each OTHER
must equal the REFERENCE's exactly (np.array_equal: same shape, same bits),
except the layout-dependent timings (train/step_time_s, train/tokens_per_s).
Every record must be complete. A ":HOST,..." suffix names the host of each
rank, in rank order, as the record's `hostnames` attribute must hold it.
Prints one line per record; exits 1 naming every difference.
"""
import sys

import h5py
import numpy as np

COMPARED_GROUPS = ("train/", "eval/", "routing/", "specialization/")
# Layout-dependent by design (see NOT_COMPARED in tests/python/test_checkpoint.py).
NOT_COMPARED = ("train/step_time_s", "train/tokens_per_s")


def read(path):
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
        attrs = {key: f.attrs[key] for key in ("status", "world_size", "hostnames", "ep_size")}
    compared = {k: v for k, v in found.items()
                if k.startswith(COMPARED_GROUPS) and not k.startswith(NOT_COMPARED)}
    return compared, attrs


def describe(attrs):
    hosts = [h.decode() if isinstance(h, bytes) else str(h) for h in attrs["hostnames"]]
    return hosts, f"world {attrs['world_size']}, EP {attrs['ep_size']}, hosts {','.join(hosts)}"


def problems(reference, other, attrs, expected_hosts):
    found = []
    hosts, _ = describe(attrs)
    if attrs["status"] != "complete":
        found.append(f"status {attrs['status']!r}, not 'complete'")
    if expected_hosts is not None and hosts != expected_hosts:
        found.append(f"ranks ran on {hosts}, expected {expected_hosts}")
    for name, want in reference.items():
        if name not in other:
            found.append(f"{name} missing")
        elif want.shape != other[name].shape:
            found.append(f"{name} shape {other[name].shape}, reference {want.shape}")
        elif not np.array_equal(want, other[name]):
            diff = np.argwhere(want != other[name])
            first = tuple(int(i) for i in diff[0]) if diff.ndim == 2 and len(diff) else ()
            found.append(f"{name} differs in {len(diff)} elements, first at {first}: "
                         f"{other[name][first]!r} vs reference {want[first]!r}")
    found += [f"{name} not in the reference" for name in other if name not in reference]
    return found


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    reference_path = sys.argv[1]
    reference, reference_attrs = read(reference_path)
    failed = not reference
    if not reference:
        print(f"compare_records: {reference_path}: no dataset to compare")
    if reference_attrs["status"] != "complete":
        failed = True
        print(f"compare_records: {reference_path}: status {reference_attrs['status']!r}")
    print(f"compare_records: reference {reference_path}: {describe(reference_attrs)[1]}, "
          f"{len(reference)} datasets")
    for argument in sys.argv[2:]:
        path, _, hosts = argument.partition(":")
        other, attrs = read(path)
        found = problems(reference, other, attrs, hosts.split(",") if hosts else None)
        if found:
            failed = True
            print(f"compare_records: {path} ({describe(attrs)[1]}):\n  " + "\n  ".join(found))
        else:
            print(f"compare_records: {path} ({describe(attrs)[1]}): "
                  f"all {len(reference)} datasets bit-identical")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
