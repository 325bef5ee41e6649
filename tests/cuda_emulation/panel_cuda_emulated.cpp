// csrc/qrcp/panel_cuda.cu compiled as C++ for the CPU, its CUDA built-ins emulated (cuda_emulation.h).
#include "cuda_emulation.h"

#include "../../csrc/qrcp/panel_cuda.cu"
