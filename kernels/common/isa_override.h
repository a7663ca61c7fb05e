// The one parser of the instruction-set overrides read from the environment: INT4DDP_ISA (the
// codec: portable|avx2|avx512) and INT4DDP_GEMM_ISA (igemm: ref|avx2|avx512vnni|amx). An unset or
// empty variable means "no override"; any other value must be one of the listed names and that
// instruction set must be available, else an int4ddp::Error names the variable, the value and the
// choices (never a silent fallback).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <string>

#include "kernels/common/error.h"

namespace int4ddp {

// The instruction set named by environment variable `var`, chosen among `isas` by `name(isa)`;
// `fallback` when the variable is unset or empty. Throws Error when the value names none of
// `isas`, or names one for which `available(isa)` is false.
template <typename Isa, std::size_t N, typename NameFn, typename AvailableFn>
Isa isa_from_env(const char* var, const Isa (&isas)[N], NameFn&& name, AvailableFn&& available,
                 Isa fallback) {
  const char* env = std::getenv(var);
  if (env == nullptr || *env == '\0') return fallback;
  const std::string value(env);
  std::string choices;
  for (const Isa isa : isas) {
    if (value == name(isa)) {
      INT4DDP_CHECK(available(isa), var, " = ", value,
                    " is not available on this CPU, build or OS (choose another or unset ", var,
                    ")");
      return isa;
    }
    choices += choices.empty() ? "" : ", ";
    choices += name(isa);
  }
  INT4DDP_FAIL(var, " = '", value, "' is not one of ", choices);
}

}  // namespace int4ddp
