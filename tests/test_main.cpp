// GoogleTest main for the MPI test binary: every rank runs every test, only
// rank 0 prints, and the run fails if any rank failed. Like moesim itself it
// first makes sure OpenBLAS runs the right kernel for this CPU.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "moesim/platform.h"

int main(int argc, char **argv) {
    Platform platform;
    platform_start(&platform, argv);
    MPI_Init(&argc, &argv);
    ::testing::InitGoogleTest(&argc, argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank != 0) {
        auto &listeners = ::testing::UnitTest::GetInstance()->listeners();
        delete listeners.Release(listeners.default_result_printer());
    } else {
        char line[512];
        platform_describe(&platform, line, sizeof line);
        printf("platform: %s\n", line);
        if (platform.error[0]) fprintf(stderr, "warning: %s\n", platform.error);
    }
    int failed = RUN_ALL_TESTS() != 0;
    int any_failed = 0;
    MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any_failed;
}
