// Shared by the MPI test suites (label mpi): the world communicator that mpi_test_main.cpp creates
// before any test runs. Every rank runs every test in the same order, so a test may call
// collectives; a test must make the same collective calls on every rank even when it fails
// (use EXPECT_*, not ASSERT_*, before a collective).
#pragma once

#include "comm/communicator.h"

namespace int4ddp::test {

// MPI_COMM_WORLD as a Communicator (the MPI backend).
comm::Communicator& world();

}  // namespace int4ddp::test
