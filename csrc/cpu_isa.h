// Which SIMD path the CPU kernel takes. Picked once from the running CPU; tests pin each path.
#pragma once

namespace red_kernels {

const char* cpu_isa_name();
bool set_cpu_isa(const char* name);  // "avx512" | "avx2" | "scalar"; false if this CPU lacks it
const char* supported_cpu_isas();

}  // namespace red_kernels
