// Fuzzes the YAML config parser with --set overrides (parse_config). Input: YAML text; every line
// "#set KEY=VALUE" (a YAML comment) is also passed as an override, in order. A config that parses
// must print and parse back to the same config (same hash): a mismatch aborts.
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "src/config/config.h"
#include "tests/fuzz/fuzz_harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);)
    if (line.rfind("#set ", 0) == 0) overrides.push_back(line.substr(5));
  return int4ddp::fuzz::run_expecting_error([&] {
    const int4ddp::Config c = int4ddp::parse_config(text, "fuzz.yaml", overrides);
    const std::string yaml = int4ddp::config_to_yaml(c);
    (void)int4ddp::config_table(c);
    (void)int4ddp::config_to_json(c);
    const int4ddp::Config again = int4ddp::parse_config(yaml, "round-trip.yaml");
    if (int4ddp::config_hash(again) != int4ddp::config_hash(c)) std::abort();
  });
}
