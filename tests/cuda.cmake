# CUDA tests (label cuda): built whenever CUDA is, skipped at run time without a GPU (each test
# calls GTEST_SKIP when cudaGetDeviceCount finds no device), so CI compiles and passes them.
if(INT4DDP_HAVE_CUDA)
  int4ddp_test(test_cuda_codec LABEL cuda SOURCES test_cuda_codec.cpp)
  int4ddp_test(test_cuda_two_shot LABEL cuda SOURCES test_cuda_two_shot.cpp)
  int4ddp_test(test_cuda_buckets LABEL cuda SOURCES test_cuda_buckets.cpp)
  int4ddp_test(test_cuda_math LABEL cuda SOURCES test_cuda_math.cpp)
  target_link_libraries(test_cuda_math PRIVATE int4ddp_cuda_math)
  int4ddp_test(test_cuda_layers LABEL cuda SOURCES test_cuda_layers.cpp)
  int4ddp_test(test_cuda_quant_layers LABEL cuda SOURCES test_cuda_quant_layers.cpp)
  target_link_libraries(test_cuda_quant_layers PRIVATE int4ddp_cuda_math)
endif()
