# MPI test suites (label mpi): each gtest executable runs under mpirun with 1, 2, 3 and 4 ranks.
#
# int4ddp_mpi_test(name SOURCES ...) builds `name` from SOURCES plus tests/mpi_test_main.cpp (a gtest
# main that creates the MPI communicator, prints from rank 0 only, prints other ranks' failures
# prefixed "[rank r]", and exits non-zero on every rank when any rank failed), and registers the
# ctest tests name.np1 .. name.np4.
#
# CI machines have 2 cores and run ctest -j 2: a run with N ranks reserves N processors (ctest caps
# that at -j, so the 2-, 3- and 4-rank runs take the whole machine and never overlap another test;
# oversubscribed busy-polling ranks run several times slower when they share cores).
# The environment makes OpenMPI work in containers and as root: shared-memory and self transports
# only, no single-copy mechanism (CMA needs ptrace rights containers usually lack), oversubscription
# allowed, and ranks that yield the core while they wait.
if(NOT INT4DDP_MPI)
  return()
endif()

# OpenMPI needs --allow-run-as-root as root (and accepts it otherwise); --oversubscribe lets 3 and
# 4 ranks start on 2 cores. MPICH's mpiexec knows neither flag and oversubscribes by itself.
execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _int4ddp_mpiexec_version
                ERROR_VARIABLE _int4ddp_mpiexec_version RESULT_VARIABLE _int4ddp_mpiexec_rc)
if(_int4ddp_mpiexec_version MATCHES "Open MPI|OpenRTE")
  set(INT4DDP_MPIEXEC_FLAGS --allow-run-as-root --oversubscribe)
else()
  set(INT4DDP_MPIEXEC_FLAGS)
endif()

set(INT4DDP_MPI_TEST_ENV
  OMPI_MCA_btl=self,vader
  OMPI_MCA_btl_vader_single_copy_mechanism=none
  OMPI_MCA_rmaps_base_oversubscribe=1
  OMPI_MCA_mpi_yield_when_idle=1
  OMPI_ALLOW_RUN_AS_ROOT=1
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
)

function(int4ddp_mpi_test name)
  cmake_parse_arguments(T "" "" "SOURCES" ${ARGN})
  add_executable(${name} ${T_SOURCES} ${CMAKE_CURRENT_SOURCE_DIR}/mpi_test_main.cpp)
  target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(${name} PRIVATE int4ddp_comm GTest::gtest int4ddp_warnings)
  foreach(np 1 2 3 4)
    add_test(NAME ${name}.np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${INT4DDP_MPIEXEC_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${name}> ${MPIEXEC_POSTFLAGS})
    set_tests_properties(${name}.np${np} PROPERTIES
      LABELS mpi
      TIMEOUT 120
      PROCESSORS ${np}
      ENVIRONMENT "${INT4DDP_MPI_TEST_ENV}")
  endforeach()
endfunction()

int4ddp_mpi_test(test_comm SOURCES test_comm_communicator.cpp test_comm_two_shot.cpp
                 test_comm_buckets.cpp test_comm_hierarchy.cpp test_comm_ring.cpp test_comm_auto_mode.cpp)
# Graceful preemption: one rank gets the signal, every rank stops after the same step.
int4ddp_mpi_test(test_run_safety_mpi SOURCES test_run_safety_mpi.cpp)
target_link_libraries(test_run_safety_mpi PRIVATE int4ddp_core)
