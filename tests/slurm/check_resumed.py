"""Checks that a run stopped and resumed (requeued) ended as the uninterrupted one.

usage: check_resumed.py --resume-steps S1,S2,... REFERENCE.h5 REFERENCE_SAVE_DIR RESUMED.h5 RESUMED_SAVE_DIR

Every dataset of the reference record but the timings (train/, eval/,
routing/, specialization/, traffic/) and every dataset of its final checkpoint
(params/, adam_m/, adam_v/) must be in the resumed run with the same shape and
values (np.array_equal), and the final checkpoints must be of the same
iteration; the resumed record must be complete, with one /resumes row per
restart at the given steps. Exits 1 naming every difference.
"""
import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

# Wall-clock measurements differ from run to run; /resumes is the restarts.
NOT_COMPARED = ("timing/", "resumes/", "train/step_time_s", "train/tokens_per_s")
# What must be compared, so that an empty or truncated reference cannot pass.
REQUIRED_GROUPS = ("train/", "eval/", "routing/", "specialization/")


def datasets(path):
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def final_checkpoint(save_dir):
    latest = Path(save_dir) / "latest_checkpointed_iteration.txt"
    return Path(save_dir) / f"iter_{int(latest.read_text()):07d}.h5"


def differences(reference, other, what):
    a, b = datasets(reference), datasets(other)
    compared = sorted(k for k in a if not k.startswith(NOT_COMPARED))
    found = []
    for k in compared:
        if k not in b:
            found.append(f"{what}: {k} missing")
        elif a[k].shape != b[k].shape:
            found.append(f"{what}: {k} has shape {b[k].shape}, not {a[k].shape}")
        elif not np.array_equal(a[k], b[k]):
            rows = np.nonzero(np.any((a[k] != b[k]).reshape(len(a[k]), -1), axis=1))[0] \
                if a[k].ndim else []
            found.append(f"{what}: {k} differs (first differing row {rows[0] if len(rows) else '-'})")
    extra = sorted(k for k in b if k not in a and not k.startswith(NOT_COMPARED))
    if extra:
        found.append(f"{what}: only the resumed run has {', '.join(extra)}")
    return found, len(compared)


def problems(args):
    found, compared = differences(args.reference, args.resumed, "record")
    for group in REQUIRED_GROUPS:
        with h5py.File(args.reference, "r") as f:
            if group.rstrip("/") not in f:
                found.append(f"the reference record has no {group}: nothing to compare there")
    reference_ckpt = final_checkpoint(args.reference_save)
    resumed_ckpt = final_checkpoint(args.resumed_save)
    with h5py.File(reference_ckpt, "r") as f, h5py.File(resumed_ckpt, "r") as g:
        for attr in ("iteration", "optimizer_steps"):
            if f.attrs[attr] != g.attrs[attr]:
                found.append(f"final checkpoint: {attr} {g.attrs[attr]}, not {f.attrs[attr]}")
    ckpt_found, ckpt_compared = differences(reference_ckpt, resumed_ckpt, "final checkpoint")
    found += ckpt_found
    with h5py.File(args.resumed, "r") as f:
        if f.attrs.get("status") != "complete":
            found.append(f"status is {f.attrs.get('status')!r}, not 'complete'")
        steps = [int(s) for s in f["resumes/step"][()]] if "resumes" in f else []
    if steps != args.resume_steps:
        found.append(f"/resumes/step is {steps}, not {args.resume_steps}")
    return found, compared, ckpt_compared


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume-steps", required=True,
                        type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("reference")
    parser.add_argument("reference_save")
    parser.add_argument("resumed")
    parser.add_argument("resumed_save")
    args = parser.parse_args()
    found, compared, ckpt_compared = problems(args)
    if found:
        for line in found:
            print(f"check_resumed: {args.resumed}: {line}")
        sys.exit(1)
    print(f"check_resumed: {args.resumed}: resumed at steps {args.resume_steps}, complete, equal to "
          f"{args.reference} in {compared} record and {ckpt_compared} final-checkpoint datasets")


if __name__ == "__main__":
    main()
