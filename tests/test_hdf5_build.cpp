// The HDF5 moesim was built with: a serial one is refused at start-up with a
// message naming it and the fix (record_require_parallel_hdf5).
#include <gtest/gtest.h>

#include <string>

extern "C" {
#include "moesim/record.h"
}

namespace {

TEST(Hdf5Build, ThisBuildHasParallelHdf5) {
    EXPECT_EQ(record_hdf5_is_parallel(), 1) << "the Makefile picked a serial HDF5";
    char err[1024] = "";
    EXPECT_EQ(record_require_parallel_hdf5(record_hdf5_is_parallel(), err, sizeof err), 0) << err;
}

TEST(Hdf5Build, SerialHdf5IsRefusedNamingItAndTheFix) {
    char err[1024] = "";
    ASSERT_EQ(record_require_parallel_hdf5(0, err, sizeof err), -1);
    std::string message(err);
    for (const char *part : {"built with HDF5 1.", "without parallel (MPI-IO) support",
                             "module load hdf5/parallel", "HDF5_DIR", "make clean && make"})
        EXPECT_NE(message.find(part), std::string::npos) << part << "\n" << message;
}

}  // namespace
