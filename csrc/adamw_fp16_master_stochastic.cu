// Kernel variants of one store mode and param dtype (see adamw_launch.h); one compilation
// unit each, so that a build compiles them in parallel.
#include "adamw_kernel.cuh"

namespace rlvr_optim {
RLVR_OPTIM_DEFINE_LAUNCHER(launcher_fp16_master_stochastic, kHalfFp16,
                           StoreMode::kMasterStochastic, 1)
}  // namespace rlvr_optim
