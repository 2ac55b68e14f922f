// Emulation stand-in for the CUDA header of this name (see ../tfk_cuda_emu.h).
#pragma once
#include "../tfk_cuda_emu.h"
