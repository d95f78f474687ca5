"""The platform facts of a real run: which OpenBLAS kernel build/moesim runs
when OPENBLAS_CORETYPE is unset (never a generic fallback on a CPU with AVX2
or AVX-512), a user-set kernel kept, one that cannot run stopping every rank
with one message, moesim's own restart with its choice, BLAS threads, and
flush-to-zero on and off, as the header and the run record show them."""
import os
import re
import subprocess

import h5py
import numpy as np
import pytest

from moesim_run import BUILD, clean_env, flags

TINY = {"data-format": "synthetic", "synthetic-tokens": 5000, "num-layers": 2,
        "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16, "micro-batch-size": 2,
        "num-experts": 4, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 32, "train-iters": 2,
        "eval-interval": 2, "eval-iters": 1}

AVX512_KERNELS = {"SkylakeX", "Cooperlake"}
AVX2_KERNELS = {"Haswell", "Zen"} | AVX512_KERNELS


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


CPU = cpu_flags()
HAS_AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= CPU
HAS_AVX2 = {"avx2", "fma"} <= CPU


def env_without_kernel(**extra):
    """The test environment with no kernel or thread count forced."""
    env = clean_env()
    for name in ("OPENBLAS_CORETYPE", "MOESIM_BLAS_KERNEL_STATE", "OPENBLAS_NUM_THREADS",
                 "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        env.pop(name, None)
    env.update(extra)
    return env


def platform(**extra):
    return subprocess.run([str(BUILD / "moesim"), "platform"], env=env_without_kernel(**extra),
                          capture_output=True, text=True, timeout=60)


def kernel_of(text):
    match = re.search(r"kernel (\w+)", text)
    assert match, text
    return match.group(1)


def train(tmp_path, env, ranks=1, **options):
    out = tmp_path / "run.h5"
    opts = {**TINY, "out": out, **options}
    if ranks == 1:
        cmd = [str(BUILD / "moesim"), "train", *flags(opts)]
    else:
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none",
               str(BUILD / "moesim"), "train", *flags(opts)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return result, out


def root_attrs(path):
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has neither AVX2+FMA nor AVX-512")
def test_unset_coretype_never_runs_a_generic_fallback_kernel(tmp_path):
    result = platform()
    assert result.returncode == 0, result.stderr
    kernel = kernel_of(result.stdout)
    assert kernel in (AVX512_KERNELS if HAS_AVX512 else AVX2_KERNELS), result.stdout
    # The same choice on every rank of a real run, in the header and the record.
    run, out = train(tmp_path, env_without_kernel(), ranks=2)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"kernel {kernel}" in run.stdout
    attrs = root_attrs(out)
    assert attrs["blas_kernel"] == kernel
    assert attrs["blas_kernel_chosen_by"] in ("openblas", "moesim")
    assert attrs["blas_library"].startswith("OpenBLAS ")


def test_user_set_kernel_is_kept_and_recorded(tmp_path):
    result = platform(OPENBLAS_CORETYPE="Prescott")
    assert result.returncode == 0, result.stderr
    assert kernel_of(result.stdout) == "Prescott"
    run, out = train(tmp_path, env_without_kernel(OPENBLAS_CORETYPE="Prescott"))
    assert run.returncode == 0, run.stdout + run.stderr
    attrs = root_attrs(out)
    assert attrs["blas_kernel"] == "Prescott"
    assert attrs["blas_kernel_chosen_by"] == "user"


def test_moesim_restart_with_its_choice_is_reported(tmp_path):
    """The state moesim hands its own restart: the kernel it set and what
    OpenBLAS had detected."""
    best = kernel_of(platform().stdout)
    result = platform(OPENBLAS_CORETYPE=best, MOESIM_BLAS_KERNEL_STATE="chosen:Prescott")
    assert result.returncode == 0, result.stderr
    assert f"kernel {best} (chosen by moesim; OpenBLAS detected Prescott)" in result.stdout


@pytest.mark.skipif(HAS_AVX512, reason="this CPU runs every kernel of the table")
def test_moesim_choice_failing_the_self_check_is_dropped_by_a_second_restart():
    """SkylakeX on a CPU without AVX-512 dies of SIGILL in the self-check's
    child; moesim restarts again with OpenBLAS's own choice and says so."""
    result = platform(OPENBLAS_CORETYPE="SkylakeX", MOESIM_BLAS_KERNEL_STATE="chosen:Haswell")
    assert result.returncode == 0, result.stderr
    assert "SkylakeX failed moesim's self-check" in result.stderr
    assert "SkylakeX failed the self-check" in result.stdout
    assert kernel_of(result.stdout) in AVX2_KERNELS | {"Sandybridge", "Prescott"}


@pytest.mark.skipif(HAS_AVX512, reason="this CPU runs every kernel of the table")
def test_user_kernel_failing_the_self_check_stops_every_rank(tmp_path):
    run, out = train(tmp_path, env_without_kernel(OPENBLAS_CORETYPE="SkylakeX"), ranks=2)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert output.count("moesim: error:") == 1, output
    assert "OPENBLAS_CORETYPE=SkylakeX fails moesim's sgemm self-check" in output
    assert "unset OPENBLAS_CORETYPE" in output
    assert not out.exists()


def test_unknown_user_kernel_stops_every_rank(tmp_path):
    run, out = train(tmp_path, env_without_kernel(OPENBLAS_CORETYPE="NoSuchCore"), ranks=2)
    assert run.returncode == 2, run.stdout + run.stderr
    output = run.stdout + run.stderr
    assert output.count("moesim: error:") == 1, output
    assert "OPENBLAS_CORETYPE=NoSuchCore is not a kernel" in output
    assert not out.exists()


def test_one_blas_thread_per_rank_unless_the_environment_says(tmp_path):
    run, out = train(tmp_path, env_without_kernel())
    assert run.returncode == 0, run.stdout + run.stderr
    assert root_attrs(out)["blas_threads"] == 1
    out.unlink()
    run, out = train(tmp_path, env_without_kernel(OPENBLAS_NUM_THREADS="2"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert root_attrs(out)["blas_threads"] == 2
    assert "2 BLAS threads per rank (from the environment)" in run.stdout


def test_more_threads_than_cores_warns_once_per_node(tmp_path):
    ranks = (os.cpu_count() or 1) + 1
    run, _ = train(tmp_path, env_without_kernel(), ranks=ranks,
                   **{"expert-model-parallel-size": 1})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr.count("exceed its") == 1, run.stderr


def test_flush_to_zero_is_the_default_and_can_be_turned_off(tmp_path):
    run, out = train(tmp_path, env_without_kernel(), ranks=2)
    assert run.returncode == 0, run.stdout + run.stderr
    attrs = root_attrs(out)
    assert attrs["denormals"] == "flushed"
    assert attrs["config.flush_denormals"] == 1
    assert "denormals flushed (FTZ+DAZ)" in run.stdout
    out.unlink()
    run, out = train(tmp_path, env_without_kernel(), ranks=2, **{"flush-denormals": 0})
    assert run.returncode == 0, run.stdout + run.stderr
    attrs = root_attrs(out)
    assert attrs["denormals"] == "kept"
    assert attrs["config.flush_denormals"] == 0


def test_flush_denormals_rejects_other_values(tmp_path):
    run, out = train(tmp_path, env_without_kernel(), ranks=2, **{"flush-denormals": 2})
    assert run.returncode == 2
    output = run.stdout + run.stderr
    assert output.count("moesim: error:") == 1, output
    assert "--flush-denormals" in output
    assert not out.exists()


@pytest.mark.skipif(not HAS_AVX2, reason="no kernel faster than Prescott on this CPU")
def test_bench_warns_loudly_when_a_faster_kernel_exists(tmp_path):
    result = subprocess.run(
        [str(BUILD / "moesim"), "bench", *flags({**TINY, "out": tmp_path / "unused.h5"})],
        env=env_without_kernel(OPENBLAS_CORETYPE="Prescott"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING: OpenBLAS runs its Prescott kernel" in result.stdout
    assert "(Prescott) | MFU" in result.stdout
    assert "step's own sgemm shapes" in result.stdout


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return [float(g) for g in match.groups()]


# The 2-rank bench splits the exposed exchange into moving rows and waiting
# for the busiest rank, says how far expert shadowing evened the ranks' rows,
# and gives weak scaling in model FLOP/s as well; each
# figure is consistent with the ones it is made of.
def test_two_rank_bench_names_the_wait_for_the_busiest_rank(tmp_path):
    result = subprocess.run(
        ["mpirun", "-n", "2", "--oversubscribe", "--bind-to", "none", str(BUILD / "moesim"),
         "bench", *flags({**TINY, "num-experts": 4, "moe-expert-shadowing": 1,
                          "moe-shadow-min-rows": 1,
                          "out": tmp_path / "unused.h5"})],
        env=env_without_kernel(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    imbalance, shadowed, computed, exposed, moving, pairs, waiting, share = number(
        r"busiest rank's expert rows are ([\d.]+)x the mean .* with ([\d.]+)% of the rows "
        r"shadowed .* it computes ([\d.]+)x; dispatch \+ combine exposed ([\d.]+) ms per step: "
        r"moving rows ~([\d.]+) ms \((\d+) exchanges at the cost above\), waiting for the "
        r"busiest rank ~([\d.]+) ms \(([\d.]+)% of a step\)", text)
    assert imbalance >= 1.0
    # Shadows are taken only to lighten the busiest rank, here whenever they save a row.
    assert 0.0 < shadowed < 100.0
    assert 1.0 <= computed < imbalance
    assert pairs == 4  # 2 MoE layers, forward and backward
    # Three times each printed to 0.1 ms: their rounding adds up to 0.15.
    assert waiting == pytest.approx(max(exposed - moving, 0.0), abs=0.151)
    whole, at_dispatch, at_combine = number(
        r"the exposed ([\d.]+) ms are ([\d.]+) ms at the dispatches .* and ([\d.]+) ms at the "
        r"combines", text)
    assert whole == exposed
    assert at_dispatch + at_combine == pytest.approx(exposed, abs=0.151)
    assert 0.0 <= share <= 100.0
    single, double, efficiency = number(
        r"in model FLOP/s per rank ([\d.]+) -> ([\d.]+) GFLOP/s, efficiency ([\d.]+)", text)
    # Printed to 0.1 GFLOP/s and 0.001: the ratio of the unrounded rates lies
    # within what the rounding allows (the tiny model runs at a few GFLOP/s).
    assert (double - 0.05) / (single + 0.05) - 0.0005 <= efficiency
    assert efficiency <= (double + 0.05) / (single - 0.05) + 0.0005
    per_rank, = number(r"model ([\d.]+) GFLOP/s per rank", text)
    assert double == pytest.approx(per_rank, abs=0.051)
    # The MFU is against the sgemm run on both ranks right after each measured
    # step, and the 1-rank reference's against rank 0's sgemm after its own
    # steps, which alternate with the 2-rank run's.
    sgemm, mfu = number(r"sgemm 2048x2048 ([\d.]+) GFLOP/s \(\w+\) \| MFU ([\d.]+)", text)
    assert mfu == pytest.approx(per_rank / sgemm, abs=0.001)
    mean, low, high = number(
        r"sgemm 2048x2048 run right after each measured step on every rank at once: ([\d.]+) "
        r"GFLOP/s per rank on average \(the MFU above is against it\), ([\d.]+) to ([\d.]+) "
        r"over the ranks' probes", text)
    assert mean == sgemm and low - 0.05 <= mean <= high + 0.05
    alone, alone_low, alone_high, single_mfu, against_alone = number(
        r"the 1-rank reference of the weak scaling below ran its steps between these, on rank 0 "
        r"alone: sgemm ([\d.]+) GFLOP/s after them \(([\d.]+) to ([\d.]+)\), MFU ([\d.]+); the "
        r"2-rank MFU against it: ([\d.]+)", text)
    assert alone_low - 0.05 <= alone <= alone_high + 0.05
    rounding = 0.06 / alone + 0.001  # rates printed to 0.1 GFLOP/s, ratios to 0.001
    assert abs(single_mfu - single / alone) <= rounding
    assert abs(against_alone - per_rank / alone) <= rounding


def bench(tmp_path, **options):
    result = subprocess.run(
        [str(BUILD / "moesim"), "bench", *flags({**TINY, "out": tmp_path / "unused.h5",
                                                 **options})],
        env=env_without_kernel(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# bench measures the steps its window names: their share of routed rows
# dropped is the share a training record of the same config holds for those
# steps (routing is deterministic), for a window at the start and a later one.
def test_bench_measures_the_steps_its_window_names(tmp_path):
    same = {"train-iters": 6, "moe-expert-capacity-factor": 1.0}
    run, out = train(tmp_path, env_without_kernel(), **same, **{"eval-interval": 6})
    assert run.returncode == 0, run.stdout + run.stderr
    with h5py.File(out, "r") as f:
        routed = f["routing/tokens_per_expert"][:]
        dropped = f["routing/dropped_per_expert"][:]
    assert len(routed) == 6

    def dropped_percent(first, last):  # steps counted from 1, both included
        return 100.0 * dropped[first - 1:last].sum() / routed[first - 1:last].sum()

    windows = ((0, 2), (3, 3))
    expected = [dropped_percent(w + 1, w + n) for w, n in windows]
    assert abs(expected[0] - expected[1]) > 0.2  # the two windows can be told apart
    for (warmup, steps), percent in zip(windows, expected):
        text = bench(tmp_path, **same, **{"bench-warmup-iters": warmup, "bench-iters": steps})
        assert (f"measures steps {warmup + 1}-{warmup + steps}, after {warmup} warm-up step(s)"
                in text), text
        measured, = number(r"\| MFU [\d.]+ \| ([\d.]+)% of the routed rows dropped", text)
        assert measured == pytest.approx(percent, abs=0.051)


# bf16 runs are measured against the GEMM that runs them: the native one's own
# square-product rate, or the sgemm under the emulation and for a bf16 router.
def test_bench_measures_bf16_against_the_bf16_gemm_it_runs(tmp_path):
    text = bench(tmp_path, precision="bf16")
    native = "bf16 GEMM onednn" in text
    if native:
        model, = number(r"model ([\d.]+) GFLOP/s per rank", text)
        bf16, sgemm_ratio, mfu = number(
            r"bf16 GEMM onednn .*?: \d+x\d+ ([\d.]+) GFLOP/s \(([\d.]+)x the sgemm\): MFU "
            r"against it ([\d.]+)", text)
        assert mfu == pytest.approx(model / bf16, abs=0.002)
        assert sgemm_ratio > 0
    else:
        assert "bf16 GEMM emulated: inputs rounded to bf16, then the sgemm" in text
    assert "MFU against it" not in bench(tmp_path, precision="bf16", **{"bf16-gemm": "emulated"})
    router_only = bench(tmp_path, **{"moe-router-precision": "bf16"})
    assert "for the router's products only" in router_only or not native, router_only
    assert "bf16 GEMM" not in bench(tmp_path)


def test_record_and_header_say_which_precision_ran(tmp_path):
    run, out = train(tmp_path, env_without_kernel())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "precision: matmul inputs fp32, router fp32;" in run.stdout
    assert "bf16 GEMM: none" in run.stdout
    assert root_attrs(out)["bf16_gemm"] == "none"
    out.unlink()
    run, out = train(tmp_path, env_without_kernel(), precision="bf16", **{"bf16-gemm": "emulated"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "precision: matmul inputs bf16, router fp32;" in run.stdout
    assert "bf16 GEMM: emulated" in run.stdout
    attrs = root_attrs(out)
    assert attrs["bf16_gemm"] == "emulated"
    assert attrs["config.precision"] == "bf16"
    assert attrs["config.moe_router_precision"] == "fp32"
    assert attrs["config.bf16_gemm"] == "emulated"


def test_auto_takes_the_native_bf16_gemm_where_the_cpu_has_one(tmp_path):
    run, out = train(tmp_path, env_without_kernel(), precision="bf16")
    assert run.returncode == 0, run.stdout + run.stderr
    attrs = root_attrs(out)
    gemm = attrs["bf16_gemm"]
    assert f"bf16 GEMM: {gemm}" in run.stdout
    here = platform()
    assert f"bf16 GEMM (--bf16-gemm auto): {gemm}" in here.stdout, here.stdout
    info = subprocess.run([str(BUILD / "moesim"), "info", str(out)], env=env_without_kernel(),
                          capture_output=True, text=True, timeout=60)
    assert f"  bf16 GEMM: {gemm}\n" in info.stdout, info.stdout
    native = {"avx512_bf16", "amx_bf16"} & set(attrs["cpu_features"].split())
    if not native:
        assert gemm == "emulated"
    elif gemm != "emulated":
        assert gemm.startswith("onednn (gemm:"), gemm
        assert gemm[gemm.index(", ") + 2:gemm.index(")")] in native, gemm


# ONEDNN_MAX_CPU_ISA=AVX2 is oneDNN's own setting: it hides the bf16
# instructions from oneDNN as an AVX2 CPU would. Every rank exits non-zero with
# the one message; nothing is written.
def test_onednn_asked_where_it_cannot_run_stops_every_rank(tmp_path):
    run, out = train(tmp_path, env_without_kernel(ONEDNN_MAX_CPU_ISA="AVX2"), ranks=2,
                     precision="bf16", **{"bf16-gemm": "onednn"})
    assert run.returncode != 0, run.stdout + run.stderr
    text = run.stdout + run.stderr
    assert text.count("moesim: error: --bf16-gemm onednn: ") == 1, text
    assert "use --bf16-gemm emulated" in text
    assert not out.exists()


# Rank 1 sees an AVX2 CPU (oneDNN's own ONEDNN_MAX_CPU_ISA), rank 0 the real
# one: auto must not let them sum the same products in different orders, so
# both emulate, and the run equals a --bf16-gemm emulated run bit for bit.
# Hidden 128 puts the linear layers and experts over oneDNN's size threshold,
# so the all-native run differs and the comparison means something.
@pytest.mark.skipif(not {"avx512_bf16", "amx_bf16"} & CPU,
                    reason="the CPU has no native bf16 GEMM")
def test_auto_emulates_on_every_rank_when_one_rank_has_no_native_bf16(tmp_path):
    wide = {**TINY, "hidden-size": 128, "moe-ffn-hidden-size": 128, "ffn-hidden-size": 128,
            "seq-length": 32, "micro-batch-size": 4, "train-iters": 3, "precision": "bf16"}
    losses = {}
    for name, gemm in (("mixed", "auto"), ("emulated", "emulated"), ("native", "auto")):
        out = tmp_path / f"{name}.h5"
        opts = flags({**wide, "out": out, "bf16-gemm": gemm})
        rank = [str(BUILD / "moesim"), "train", *opts]
        avx2 = ["-x", "ONEDNN_MAX_CPU_ISA=AVX2"] if name == "mixed" else []
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-n", "1", *rank, ":",
               "-n", "1", *avx2, *rank]
        result = subprocess.run(cmd, env=env_without_kernel(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        with h5py.File(out, "r") as f:
            losses[name] = f["train/loss"][()]
            gemm_used = f.attrs["bf16_gemm"]
        assert (gemm_used == "emulated") == (name != "native"), (name, gemm_used)
    assert np.array_equal(losses["mixed"], losses["emulated"])
    assert not np.array_equal(losses["native"], losses["emulated"])
