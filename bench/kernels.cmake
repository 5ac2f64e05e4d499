# Decode-attention kernel benchmark; included by bench/CMakeLists.txt when LYCHEE_TORCH_CUDA.
add_executable(kernel_bench kernel_bench.cc)
target_link_libraries(kernel_bench PRIVATE lychee_cuda_torch lychee_flags)
