#!/usr/bin/python3
"""Time validation of `moesim project` (issue 15), `make validate-projection`.

Calibrates this machine once (`moesim calibrate` on --calibrate-config, by
default small.ini), then trains real runs of several configs -- the
calibration's own and others it never saw -- projects each record onto its
own layout with the calibrated cluster file, and prints the measured and
predicted step time and per-phase times with the relative error. Fails
(exit 1) when the median absolute error of the step time over all runs
exceeds 15%.

Shared memory here (default): 1 and 2 ranks. The emulated two-node cluster
(run by whoever may create the namespaces) passes its launcher and takes the
shaped links from the preset, the compute calibrated here:

    tests/multinode/cluster.sh up
    tools/validate_projection.py --launcher "bash tests/multinode/cluster_mpirun.sh \\
        --map-by slot" --worlds 4 --ranks-per-node 2 \\
        --network-from experiments/clusters/emulated_two_node.ini

Measured phase times are the median over steps (the first step is left out:
it warms caches and page tables) of the mean over ranks; the step time is the
median of /train/step_time_s. Predicted: the projection of the same steps.
"""
import argparse
import configparser
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("attention", "router", "dispatch", "experts", "combine", "grad_allreduce", "optimizer",
          "other")
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin:/usr/local/bin",
       # the emulated cluster's launcher finds its cluster by these
       **{k: v for k, v in os.environ.items() if k.startswith("MOESIM_CLUSTER_")}}


def run(cmd):
    print("+", " ".join(map(str, cmd)), flush=True)
    result = subprocess.run(list(map(str, cmd)), env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def launch(args, world):
    if world == 1 and not args.launcher:
        return []
    launcher = shlex.split(args.launcher) if args.launcher else \
        ["mpirun", "--oversubscribe", "--bind-to", "none"]
    return [*launcher, "-n", str(world)]


def measured(record):
    with h5py.File(record, "r") as f:
        step = np.median(f["train/step_time_s"][1:])
        phases = {p: np.median(f[f"timing/{p}"][1:].mean(axis=1)) for p in PHASES}
    return step, phases


def predicted(projection):
    with h5py.File(projection, "r") as f:
        step = np.median(f["projection/step_time_s"][1:])
        ph = f["projection/phase_s"][1:]  # [S, P, phases]
        phases = {p: np.median(ph[:, :, i].mean(axis=1)) for i, p in enumerate(PHASES)}
    return step, phases


def with_network_of(calibrated, links, out):
    """The calibrated device, node and [vector] values with the [network] of
    another cluster file (the emulated cluster's shaped links)."""
    merged = configparser.ConfigParser()
    merged.read(calibrated)
    other = configparser.ConfigParser()
    other.read(links)
    merged["network"] = dict(other["network"])
    with open(out, "w") as f:
        f.write(f"; {calibrated} with the [network] of {links}\n")
        merged.write(f)
    return out


def simulate_big(moesim, out):
    """A global batch of 256 sequences projected to 256 virtual ranks (EP 64, 8
    ranks per node) on the H100 preset: must finish in under a minute."""
    record = out / "big.h5"
    run([moesim, "train", "--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 2,
         "--seq-length", 32, "--num-experts", 64, "--moe-router-topk", 2,
         "--moe-ffn-hidden-size", 64, "--ffn-hidden-size", 128, "--micro-batch-size", 256,
         "--moe-group-size", 32, "--train-iters", 4, "--eval-interval", 1000, "--eval-iters", 1,
         "--data-format", "synthetic", "--synthetic-tokens", 200000, "--out", record,
         "--overwrite", 1])
    start = time.monotonic()
    print(run([moesim, "project", record, "--cluster",
               ROOT / "experiments" / "clusters" / "h100_nvlink_ib400.ini", "--world-size", 256,
               "--expert-model-parallel-size", 64, "--ranks-per-node", 8,
               "--out", out / "big-projection.h5"]), end="")
    elapsed = time.monotonic() - start
    print(f"simulate big: 256 virtual ranks projected in {elapsed:.1f} s (limit 60 s)")
    if elapsed > 60:
        sys.exit("simulate big took over a minute")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibrate-config", default=str(ROOT / "experiments" / "small.ini"),
                        help="the config `moesim calibrate` fits its [vector] rates on")
    parser.add_argument("--configs", default=",".join(str(ROOT / "experiments" / c) for c in
                                                     ("small.ini", "bench.ini", "tiny.ini")),
                        help="comma list of configs to train and predict")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worlds", default="1,2", help="comma list of world sizes")
    parser.add_argument("--ranks-per-node", type=int, default=0)
    parser.add_argument("--cluster", help="a cluster file; default: calibrate here first")
    parser.add_argument("--launcher", default="", help='e.g. "mpirun --hostfile HOSTS"')
    parser.add_argument("--network-from",
                        help="a cluster file whose [network] replaces the calibrated one (the "
                             "emulated cluster's shaped links; compute is calibrated here)")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "validate-projection"))
    parser.add_argument("--max-error", type=float, default=0.15)
    args = parser.parse_args()
    moesim = ROOT / "build" / "moesim"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cluster = args.cluster
    if not cluster:
        cluster = out / "this_machine.ini"
        calibrate_world = max(2, min(map(int, args.worlds.split(","))))
        # with --network-from the compute is calibrated here, with as many ranks as the
        # cluster runs put on this machine's cores; the links come from the file
        launcher = (["mpirun", "--oversubscribe", "--bind-to", "none", "-n", str(calibrate_world)]
                    if args.network_from else launch(args, calibrate_world))
        run([*launcher, moesim, "calibrate", "--config", args.calibrate_config, "--out", cluster])
        if args.network_from:
            cluster = with_network_of(cluster, Path(args.network_from), out / "cluster.ini")
    rows, errors = [], []
    runs = [(config, world) for config in args.configs.split(",")
            for world in map(int, args.worlds.split(","))]
    for config, world in runs:
        name = f"{Path(config).stem}-p{world}"
        record = out / f"{name}.h5"
        flags = ["--config", config, "--train-iters", args.steps, "--eval-interval", 1000,
                 "--eval-iters", 1, "--out", record, "--overwrite", 1]
        if args.ranks_per_node:
            flags += ["--ranks-per-node", args.ranks_per_node]
        run([*launch(args, world), moesim, "train", *flags])
        projection = out / f"{name}-projection.h5"
        project = [moesim, "project", record, "--cluster", cluster, "--world-size", world,
                   "--out", projection]
        if args.ranks_per_node:
            project += ["--ranks-per-node", args.ranks_per_node]
        print(run(project), end="")
        m_step, m_phases = measured(record)
        p_step, p_phases = predicted(projection)
        error = abs(p_step - m_step) / m_step
        errors.append(error)
        seen = "calibrated on" if Path(config) == Path(args.calibrate_config) else "held out"
        rows.append((name, f"step ({seen})", m_step, p_step, error))
        for phase in PHASES:
            m, p = m_phases[phase], p_phases[phase]
            rows.append((name, phase, m, p, abs(p - m) / m if m > 0 else float("nan")))
    print(f"\n{'run':<12} {'phase':<26} {'measured s':>11} {'predicted s':>12} {'error':>8}")
    for name, phase, m, p, e in rows:
        print(f"{name:<12} {phase:<26} {m:>11.4f} {p:>12.4f} {100 * e:>7.1f}%")
    simulate_big(moesim, out)
    median = float(np.median(errors))
    print(f"\nmedian absolute error of the step time: {100 * median:.1f}% "
          f"(limit {100 * args.max_error:.0f}%)")
    return 0 if median <= args.max_error else 1


if __name__ == "__main__":
    sys.exit(main())
