// The config's field table, internal to src/config: every key once, with a pointer to its Config
// member and the check of its own range, and the canonical text of every value. config.cpp's
// parser, validation and printers all walk this table (see config.h).
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "src/config/config.h"

namespace int4ddp::fields {

using IntList = std::vector<int>;
using RealList = std::vector<double>;
using ValuePtr =
    std::variant<bool*, int*, int64_t*, double*, std::string*, IntList*, RealList*, ModelKind*,
                 DatasetKind*, CommBackend*, CommMode*, ScheduleKind*, ProgressBar*, TrainDevice*,
                 quant::PolicyKind*, quant::Rounding*, comm::HierarchyMode*>;
// What is wrong with the field's current value ("must be in (0, 1]"), or "" when it is valid.
using Check = std::function<std::string()>;

struct Field {
  std::string key;                        // "section.name"
  ValuePtr value;                         // the member of the Config the table was made for
  Check check;                            // the value's own range; nullptr: any value of the type
  std::vector<std::string> choices = {};  // an enumerated key: the spellings it accepts
};

// Every value of an enumerated type with its YAML spelling, in the order messages list them.
template <typename E>
using Spellings = std::vector<std::pair<E, const char*>>;
const Spellings<ModelKind>& spellings(ModelKind);
const Spellings<DatasetKind>& spellings(DatasetKind);
const Spellings<CommBackend>& spellings(CommBackend);
const Spellings<CommMode>& spellings(CommMode);
const Spellings<ScheduleKind>& spellings(ScheduleKind);
const Spellings<ProgressBar>& spellings(ProgressBar);
const Spellings<TrainDevice>& spellings(TrainDevice);
const Spellings<quant::PolicyKind>& spellings(quant::PolicyKind);
const Spellings<quant::Rounding>& spellings(quant::Rounding);
const Spellings<comm::HierarchyMode>& spellings(comm::HierarchyMode);

template <typename E>
const char* spelling_of(E v) {
  for (const auto& [value, text] : spellings(E{}))
    if (value == v) return text;
  return "?";  // only a value cast from an out-of-range integer; validate() rejects it
}

// "must be one of a, b, c"
std::string must_be_one_of(const std::vector<std::string>& choices);

// Shortest text that reads back as the same double, always with a '.' or an exponent.
std::string format_double(double v);
// YAML double-quoted scalar (also valid JSON for printable ASCII).
std::string quote(const std::string& s);
// The canonical text of a value: YAML that parses back to the same value. Used by the table, the
// YAML and the hash.
std::string format_value(const ValuePtr& value);

// The table of config c, in key order; entries point into c.
std::vector<Field> make_fields(Config& c);
// The table for reading only. make_fields only takes addresses; nothing writes through them here.
std::vector<Field> make_fields(const Config& c);

std::string section_of(const std::string& key);  // "optim.lr" -> "optim"
std::string name_of(const std::string& key);     // "optim.lr" -> "lr"

}  // namespace int4ddp::fields
