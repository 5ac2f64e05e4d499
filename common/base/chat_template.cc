// A Jinja2 subset for chat templates. The pipeline: the source is split into tokens (Lexer, with
// Jinja's whitespace control), parsed into statements and expressions (Parser, following
// jinja2/parser.py's grammar and precedence), and rendered by walking them (Renderer) over Values
// that behave as the Python objects transformers hands to Jinja: JSON from json.loads, Jinja's
// Undefined, namespaces and functions.
//
// The subset: {{ }}, {# #}, whitespace control (- and +, trim_blocks, lstrip_blocks); if / elif /
// else, for (unpacking, loop filter, else, the loop variable, break, continue), set (names,
// unpacking, namespace attributes, blocks with filters), top-level macros, transformers'
// generation block; literals (strings with Python escapes, numbers, lists, tuples, dicts),
// arithmetic, ~, comparisons, in, and / or / not, inline if, attributes, items, slices, calls;
// the globals raise_exception, strftime_now, namespace, range and dict; the str methods strip,
// lstrip, rstrip, split, startswith, endswith, replace, upper, lower, title, capitalize and the
// dict methods get, items, keys, values; the filters and tests of Filters() and Tests(). Anything
// else is an UNIMPLEMENTED error naming it.
#include "common/base/chat_template.h"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/base/json_parse.h"
#include "common/base/status_macros.h"
#include "common/base/utf8.h"
#include "nlohmann/json.hpp"

namespace lychee {
namespace chat_template_internal {
namespace {

// Debian's Abseil has a string_view of its own, which absl::StrCat takes and std::string_view
// does not convert to.
absl::string_view ToAbsl(std::string_view text) { return {text.data(), text.size()}; }

// ---------------------------------------------------------------------------------------------
// Errors. Every error but raise_exception's names the template line it comes from.

// A template that does not parse, or that fails on the values it renders.
absl::Status TemplateError(int line, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", message));
}

absl::Status Unsupported(int line, absl::string_view what) {
  return absl::UnimplementedError(absl::StrCat("chat template line ", line, ": unsupported ", what));
}

// ---------------------------------------------------------------------------------------------
// Text: UTF-8 code points (Python indexes strings by code point) and Python's whitespace.

// The code point starting at text[*pos] of valid UTF-8; moves *pos past it.
char32_t NextCodePoint(std::string_view text, size_t* pos) {
  size_t length = 0;
  const char32_t code_point = DecodeUtf8At(text, *pos, &length);
  *pos += length;
  return code_point;
}

std::u32string DecodeUtf8(std::string_view text) {
  std::u32string code_points;
  for (size_t pos = 0; pos < text.size();) code_points.push_back(NextCodePoint(text, &pos));
  return code_points;
}

std::string EncodeUtf8(std::u32string_view code_points) {
  std::string text;
  for (char32_t c : code_points) AppendUtf8(c, &text);
  return text;
}

bool IsValidUtf8(std::string_view text) {
  const auto* bytes = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  for (size_t pos = 0; pos < text.size();) {
    utf8proc_int32_t code_point;
    const utf8proc_ssize_t length =
        utf8proc_iterate(bytes + pos, static_cast<utf8proc_ssize_t>(text.size() - pos), &code_point);
    if (length <= 0) return false;
    pos += static_cast<size_t>(length);
  }
  return true;
}

// Python's str.isspace(), which str.strip(), str.split() and the regex \s of Jinja's lexer use:
// the ASCII whitespace, the information separators and the Unicode spaces and line breaks.
bool IsPythonSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// str.strip / lstrip / rstrip: without `chars` strips whitespace, else any of its code points.
std::string StripPython(std::string_view text, const std::optional<std::u32string>& chars, bool left, bool right) {
  const std::u32string code_points = DecodeUtf8(text);
  const auto strippable = [&](char32_t c) {
    return chars.has_value() ? chars->find(c) != std::u32string::npos : IsPythonSpace(c);
  };
  size_t begin = 0;
  size_t end = code_points.size();
  while (left && begin < end && strippable(code_points[begin])) ++begin;
  while (right && end > begin && strippable(code_points[end - 1])) --end;
  return EncodeUtf8(std::u32string_view(code_points).substr(begin, end - begin));
}

bool IsAscii(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

char AsciiUpper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c; }
char AsciiLower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }
bool IsAsciiLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsAsciiDigit(char c) { return c >= '0' && c <= '9'; }

// ---------------------------------------------------------------------------------------------
// Values: the Python objects a template sees. Strings and containers are shared and immutable
// (the sandbox forbids mutating them); only a namespace changes, through {% set ns.attr = %}.

struct StringData;
struct ListData;
struct DictData;
struct ObjectData;
struct FunctionData;

// How a sequence prints and behaves: Jinja's filters return generators (one-shot iterators that
// print as "<generator object ...>"); dict.items(), keys(), values() and range() return views
// (iterable again and again, printed as "dict_items([...])" or "range(0, 3)").
enum class ListKind { kList, kTuple, kGenerator, kView };

class Value {
 public:
  // In the order of the alternatives of Data.
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kObject, kFunction };

  // Jinja's Undefined. `description` says what is undefined ("'x' is undefined"): using the
  // value where Jinja raises UndefinedError reports it.
  static Value Undefined(std::string description) { return Value(UndefinedData{std::move(description)}); }
  static Value None() { return Value(NoneData{}); }
  static Value Bool(bool value) { return Value(value); }
  static Value Int(int64_t value) { return Value(value); }
  static Value Float(double value) { return Value(value); }
  static Value String(std::string value);
  // A string marked safe (the safe filter: markupsafe's Markup), which escapes plain strings
  // added to it.
  static Value Markup(std::string value);
  static Value List(std::vector<Value> items, ListKind kind = ListKind::kList);
  static Value Dict(DictData dict);
  static Value Object(std::shared_ptr<ObjectData> object) { return Value(std::move(object)); }
  static Value Function(std::shared_ptr<const FunctionData> function) { return Value(std::move(function)); }

  Value() : Value(UndefinedData{}) {}

  Kind kind() const { return static_cast<Kind>(data_.index()); }
  bool is(Kind kind) const { return this->kind() == kind; }
  // Python's bool is an int: True + 1 == 2.
  bool is_integral() const { return is(Kind::kBool) || is(Kind::kInt); }
  bool is_number() const { return is_integral() || is(Kind::kFloat); }

  const std::string& undefined_description() const { return std::get<UndefinedData>(data_).description; }
  bool as_bool() const { return std::get<bool>(data_); }
  // For bool and int.
  int64_t as_int() const { return is(Kind::kBool) ? as_bool() : std::get<int64_t>(data_); }
  // For any number.
  double as_double() const { return is(Kind::kFloat) ? std::get<double>(data_) : static_cast<double>(as_int()); }
  const std::string& as_string() const;
  bool is_markup() const;
  const ListData& as_list() const { return *std::get<std::shared_ptr<const ListData>>(data_); }
  const DictData& as_dict() const { return *std::get<std::shared_ptr<const DictData>>(data_); }
  ObjectData& as_object() const { return *std::get<std::shared_ptr<ObjectData>>(data_); }
  const FunctionData& as_function() const { return *std::get<std::shared_ptr<const FunctionData>>(data_); }
  // Identity, for what Python compares by identity (generators, functions, namespaces).
  const void* address() const;

 private:
  struct UndefinedData {
    std::string description;
  };
  struct NoneData {};
  using Data = std::variant<UndefinedData, NoneData, bool, int64_t, double, std::shared_ptr<const StringData>,
                            std::shared_ptr<const ListData>, std::shared_ptr<const DictData>,
                            std::shared_ptr<ObjectData>, std::shared_ptr<const FunctionData>>;
  template <typename T>
  explicit Value(T data) : data_(std::move(data)) {}

  Data data_;
};

struct StringData {
  std::string text;
  bool markup = false;
};

struct ListData {
  std::vector<Value> items;
  ListKind kind = ListKind::kList;
  // A generator yields its items once; a second pass is refused rather than silently empty.
  mutable bool consumed = false;
};

// A Python dict with string keys, in insertion order.
struct DictData {
  std::vector<std::pair<std::string, Value>> entries;

  const Value* Find(std::string_view key) const {
    for (const auto& [entry_key, value] : entries) {
      if (entry_key == key) return &value;
    }
    return nullptr;
  }
  // Python's d[key] = value: an existing key keeps its place.
  void Set(std::string key, Value value) {
    for (auto& [entry_key, entry_value] : entries) {
      if (entry_key == key) {
        entry_value = std::move(value);
        return;
      }
    }
    entries.emplace_back(std::move(key), std::move(value));
  }
};

// An object with attributes: a namespace() (whose attributes {% set %} may assign) or a loop.
struct ObjectData {
  enum class Type { kNamespace, kLoop };
  Type type;
  DictData attributes;
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keywords;
  // The line of the call, for errors.
  int line = 0;
};

struct FunctionData {
  std::string name;
  std::function<absl::StatusOr<Value>(const CallArgs&)> call;
};

Value Value::String(std::string value) {
  return Value(std::make_shared<const StringData>(StringData{std::move(value), false}));
}

Value Value::Markup(std::string value) {
  return Value(std::make_shared<const StringData>(StringData{std::move(value), true}));
}

const std::string& Value::as_string() const { return std::get<std::shared_ptr<const StringData>>(data_)->text; }

bool Value::is_markup() const {
  return is(Kind::kString) && std::get<std::shared_ptr<const StringData>>(data_)->markup;
}

Value Value::List(std::vector<Value> items, ListKind kind) {
  auto list = std::make_shared<ListData>();
  list->items = std::move(items);
  list->kind = kind;
  return Value(std::shared_ptr<const ListData>(std::move(list)));
}

Value Value::Dict(DictData dict) { return Value(std::make_shared<const DictData>(std::move(dict))); }

const void* Value::address() const {
  switch (kind()) {
    case Kind::kList: return &as_list();
    case Kind::kDict: return &as_dict();
    case Kind::kObject: return &as_object();
    case Kind::kFunction: return &as_function();
    default: return nullptr;
  }
}

Value MakeFunction(std::string name, std::function<absl::StatusOr<Value>(const CallArgs&)> call) {
  return Value::Function(std::make_shared<const FunctionData>(FunctionData{std::move(name), std::move(call)}));
}

// The Python type name, as Python's error messages give it.
std::string TypeName(const Value& value) {
  switch (value.kind()) {
    case Value::Kind::kUndefined: return "Undefined";
    case Value::Kind::kNone: return "NoneType";
    case Value::Kind::kBool: return "bool";
    case Value::Kind::kInt: return "int";
    case Value::Kind::kFloat: return "float";
    case Value::Kind::kString: return "str";
    case Value::Kind::kList:
      switch (value.as_list().kind) {
        case ListKind::kList: return "list";
        case ListKind::kTuple: return "tuple";
        case ListKind::kGenerator: return "generator";
        case ListKind::kView: return "view";
      }
      break;
    case Value::Kind::kDict: return "dict";
    case Value::Kind::kObject:
      return value.as_object().type == ObjectData::Type::kNamespace ? "Namespace" : "LoopContext";
    case Value::Kind::kFunction: return "function";
  }
  return "object";
}

// The UndefinedError Jinja raises where an undefined value is used for more than printing,
// testing or iterating.
absl::Status UndefinedError(int line, const Value& undefined) {
  return TemplateError(
      line, undefined.undefined_description().empty() ? "undefined value used" : undefined.undefined_description());
}

bool Truthy(const Value& value) {
  switch (value.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return false;
    case Value::Kind::kBool:
    case Value::Kind::kInt: return value.as_int() != 0;
    case Value::Kind::kFloat: return value.as_double() != 0.0;
    case Value::Kind::kString: return !value.as_string().empty();
    case Value::Kind::kList:
      // A generator is an object, true whatever it yields.
      return value.as_list().kind == ListKind::kGenerator || !value.as_list().items.empty();
    case Value::Kind::kDict: return !value.as_dict().entries.empty();
    case Value::Kind::kObject:
    case Value::Kind::kFunction: return true;
  }
  return false;
}

// The items a for loop (or a filter) goes through: a sequence's items, a dict's keys, a string's
// characters; an undefined value is empty, as in Jinja.
absl::StatusOr<std::vector<Value>> Iterate(const Value& value, int line) {
  switch (value.kind()) {
    case Value::Kind::kUndefined: return std::vector<Value>();
    case Value::Kind::kList: {
      const ListData& list = value.as_list();
      if (list.kind == ListKind::kGenerator) {
        if (list.consumed) return Unsupported(line, "second pass over a generator (a filter's result; apply |list)");
        list.consumed = true;
      }
      return list.items;
    }
    case Value::Kind::kDict: {
      std::vector<Value> keys;
      for (const auto& entry : value.as_dict().entries) keys.push_back(Value::String(entry.first));
      return keys;
    }
    case Value::Kind::kString: {
      std::vector<Value> characters;
      const std::string& text = value.as_string();
      for (size_t pos = 0; pos < text.size();) {
        const size_t start = pos;
        NextCodePoint(text, &pos);
        characters.push_back(Value::String(text.substr(start, pos - start)));
      }
      return characters;
    }
    default: return TemplateError(line, absl::StrCat("'", TypeName(value), "' object is not iterable"));
  }
}

// Python's len().
absl::StatusOr<int64_t> Length(const Value& value, int line) {
  switch (value.kind()) {
    case Value::Kind::kUndefined: return 0;
    case Value::Kind::kString: {
      const std::string& text = value.as_string();
      // Code points: every byte but UTF-8 continuation bytes starts one.
      return std::count_if(text.begin(), text.end(),
                           [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
    }
    case Value::Kind::kList:
      if (value.as_list().kind == ListKind::kGenerator) break;
      return static_cast<int64_t>(value.as_list().items.size());
    case Value::Kind::kDict: return static_cast<int64_t>(value.as_dict().entries.size());
    default: break;
  }
  return TemplateError(line, absl::StrCat("object of type '", TypeName(value), "' has no len()"));
}

// Python's ==: numbers by value (True == 1), dicts regardless of key order, lists and tuples
// never equal to each other; Jinja's Undefined equals only Undefined.
absl::StatusOr<bool> Equals(const Value& a, const Value& b, int line) {
  if (a.is_number() && b.is_number()) {
    if (a.is_integral() && b.is_integral()) return a.as_int() == b.as_int();
    return a.as_double() == b.as_double();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return true;
    case Value::Kind::kString: return a.as_string() == b.as_string();
    case Value::Kind::kList: {
      const ListData& x = a.as_list();
      const ListData& y = b.as_list();
      if (x.kind == ListKind::kView || y.kind == ListKind::kView) {
        return Unsupported(line, "comparison of views (apply |list)");
      }
      if (x.kind == ListKind::kGenerator || y.kind == ListKind::kGenerator) return &x == &y;
      if (x.kind != y.kind || x.items.size() != y.items.size()) return false;
      for (size_t i = 0; i < x.items.size(); ++i) {
        LYCHEE_ASSIGN_OR_RETURN(const bool equal, Equals(x.items[i], y.items[i], line));
        if (!equal) return false;
      }
      return true;
    }
    case Value::Kind::kDict: {
      const DictData& x = a.as_dict();
      const DictData& y = b.as_dict();
      if (x.entries.size() != y.entries.size()) return false;
      // Keys may come in another order.
      std::unordered_map<std::string_view, const Value*> y_values;
      for (const auto& [key, value] : y.entries) y_values.emplace(key, &value);
      for (const auto& [key, value] : x.entries) {
        const auto other = y_values.find(key);
        if (other == y_values.end()) return false;
        LYCHEE_ASSIGN_OR_RETURN(const bool equal, Equals(value, *other->second, line));
        if (!equal) return false;
      }
      return true;
    }
    default: return a.address() == b.address();
  }
}

// Python's ordering comparisons (<, <=, >, >=): numbers, strings (by code point, which UTF-8
// byte order preserves), and lists or tuples lexicographically.
absl::StatusOr<bool> Less(const Value& a, const Value& b, int line, absl::string_view op);

absl::StatusOr<bool> OrderedCompare(const Value& a, const Value& b, absl::string_view op, int line) {
  if (op == "<") return Less(a, b, line, op);
  if (op == ">") return Less(b, a, line, op);
  LYCHEE_ASSIGN_OR_RETURN(const bool greater, Less(b, a, line, op));
  LYCHEE_ASSIGN_OR_RETURN(const bool less, Less(a, b, line, op));
  return op == "<=" ? !greater : !less;
}

absl::StatusOr<bool> Less(const Value& a, const Value& b, int line, absl::string_view op) {
  if (a.is_number() && b.is_number()) {
    if (a.is_integral() && b.is_integral()) return a.as_int() < b.as_int();
    return a.as_double() < b.as_double();
  }
  if (a.is(Value::Kind::kString) && b.is(Value::Kind::kString)) return a.as_string() < b.as_string();
  if (a.is(Value::Kind::kList) && b.is(Value::Kind::kList) && a.as_list().kind == b.as_list().kind &&
      (a.as_list().kind == ListKind::kList || a.as_list().kind == ListKind::kTuple)) {
    const std::vector<Value>& x = a.as_list().items;
    const std::vector<Value>& y = b.as_list().items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      LYCHEE_ASSIGN_OR_RETURN(const bool equal, Equals(x[i], y[i], line));
      if (!equal) return Less(x[i], y[i], line, op);
    }
    return x.size() < y.size();
  }
  if (a.is(Value::Kind::kUndefined)) return UndefinedError(line, a);
  if (b.is(Value::Kind::kUndefined)) return UndefinedError(line, b);
  return TemplateError(
      line, absl::StrCat("'", op, "' not supported between instances of '", TypeName(a), "' and '", TypeName(b), "'"));
}

// Python's `needle in container`.
absl::StatusOr<bool> Contains(const Value& container, const Value& needle, int line) {
  switch (container.kind()) {
    case Value::Kind::kUndefined: return false;
    case Value::Kind::kString:
      if (!needle.is(Value::Kind::kString)) {
        return TemplateError(line, absl::StrCat("'in <string>' requires string as left operand, not ", TypeName(needle)));
      }
      return container.as_string().find(needle.as_string()) != std::string::npos;
    case Value::Kind::kDict:
      return needle.is(Value::Kind::kString) && container.as_dict().Find(needle.as_string()) != nullptr;
    case Value::Kind::kList: {
      LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(container, line));
      for (const Value& item : items) {
        LYCHEE_ASSIGN_OR_RETURN(const bool equal, Equals(item, needle, line));
        if (equal) return true;
      }
      return false;
    }
    default: return TemplateError(line, absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
  }
}

// ---------------------------------------------------------------------------------------------
// Printing values as Python does: str() for {{ }} and the string filter, repr() inside
// containers, and json.dumps for tojson.

// float.__repr__: the shortest digits that read back the same, in positional notation unless the
// exponent is below -4 or above 15, and always with a fractional part or an exponent.
std::string FloatRepr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::scientific);
  const std::string_view scientific(buffer, static_cast<size_t>(result.ptr - buffer));
  const size_t e = scientific.find('e');
  std::string_view mantissa = scientific.substr(0, e);
  const int exponent = std::atoi(std::string(scientific.substr(e + 1)).c_str());
  std::string sign;
  if (!mantissa.empty() && mantissa[0] == '-') {
    sign = "-";
    mantissa.remove_prefix(1);
  }
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') digits.push_back(c);
  }
  const int digit_count = static_cast<int>(digits.size());
  // The decimal point sits after `point` digits.
  const int point = exponent + 1;
  if (point <= -4 || point > 16) {
    std::string text = sign + digits.substr(0, 1);
    if (digit_count > 1) absl::StrAppend(&text, ".", digits.substr(1));
    const std::string magnitude = std::to_string(std::abs(exponent));
    absl::StrAppend(&text, "e", exponent < 0 ? "-" : "+", magnitude.size() < 2 ? "0" : "", magnitude);
    return text;
  }
  if (point <= 0) return absl::StrCat(sign, "0.", std::string(static_cast<size_t>(-point), '0'), digits);
  if (point >= digit_count) {
    return absl::StrCat(sign, digits, std::string(static_cast<size_t>(point - digit_count), '0'), ".0");
  }
  return absl::StrCat(sign, digits.substr(0, static_cast<size_t>(point)), ".",
                      digits.substr(static_cast<size_t>(point)));
}

void AppendHexEscape(char prefix, int width, char32_t code_point, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  out->push_back('\\');
  out->push_back(prefix);
  for (int shift = (width - 1) * 4; shift >= 0; shift -= 4) out->push_back(kHex[(code_point >> shift) & 0xF]);
}

// str.isprintable() of one character: not a control, format, surrogate, private-use, unassigned
// or separator character, the ASCII space excepted.
bool IsPythonPrintable(char32_t c) {
  if (c == ' ') return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
    case UTF8PROC_CATEGORY_ZS: return false;
    default: return true;
  }
}

// str.__repr__: single quotes unless the text has one and no double quote.
void AppendStringRepr(std::string_view text, std::string* out) {
  const bool has_single = text.find('\'') != std::string_view::npos;
  const bool has_double = text.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  out->push_back(quote);
  for (size_t pos = 0; pos < text.size();) {
    const size_t start = pos;
    const char32_t c = NextCodePoint(text, &pos);
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
    } else if (c == '\t') {
      out->append("\\t");
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '\r') {
      out->append("\\r");
    } else if (c < ' ' || c == 0x7F) {
      AppendHexEscape('x', 2, c, out);
    } else if (c < 0x7F || IsPythonPrintable(c)) {
      out->append(text.substr(start, pos - start));
    } else if (c <= 0xFF) {
      AppendHexEscape('x', 2, c, out);
    } else if (c <= 0xFFFF) {
      AppendHexEscape('u', 4, c, out);
    } else {
      AppendHexEscape('U', 8, c, out);
    }
  }
  out->push_back(quote);
}

absl::Status AppendRepr(const Value& value, int line, std::string* out);

// str(value): what {{ value }} prints.
absl::Status AppendStr(const Value& value, int line, std::string* out) {
  switch (value.kind()) {
    case Value::Kind::kUndefined: return absl::OkStatus();
    case Value::Kind::kString: out->append(value.as_string()); return absl::OkStatus();
    default: return AppendRepr(value, line, out);
  }
}

absl::StatusOr<std::string> Str(const Value& value, int line) {
  std::string text;
  LYCHEE_RETURN_IF_ERROR(AppendStr(value, line, &text));
  return text;
}

absl::Status AppendRepr(const Value& value, int line, std::string* out) {
  switch (value.kind()) {
    case Value::Kind::kUndefined: out->append("Undefined"); return absl::OkStatus();
    case Value::Kind::kNone: out->append("None"); return absl::OkStatus();
    case Value::Kind::kBool: out->append(value.as_bool() ? "True" : "False"); return absl::OkStatus();
    case Value::Kind::kInt: out->append(std::to_string(value.as_int())); return absl::OkStatus();
    case Value::Kind::kFloat: out->append(FloatRepr(value.as_double())); return absl::OkStatus();
    case Value::Kind::kString:
      if (value.is_markup()) out->append("Markup(");
      AppendStringRepr(value.as_string(), out);
      if (value.is_markup()) out->push_back(')');
      return absl::OkStatus();
    case Value::Kind::kList: {
      const ListData& list = value.as_list();
      if (list.kind == ListKind::kGenerator || list.kind == ListKind::kView) {
        // Python prints "<generator object ... at 0x7f...>" or "dict_items([...])".
        return Unsupported(line, absl::StrCat("printing a ", TypeName(value), " (apply |list)"));
      }
      const bool tuple = list.kind == ListKind::kTuple;
      out->push_back(tuple ? '(' : '[');
      for (size_t i = 0; i < list.items.size(); ++i) {
        if (i > 0) out->append(", ");
        LYCHEE_RETURN_IF_ERROR(AppendRepr(list.items[i], line, out));
      }
      if (tuple && list.items.size() == 1) out->push_back(',');
      out->push_back(tuple ? ')' : ']');
      return absl::OkStatus();
    }
    case Value::Kind::kDict: {
      out->push_back('{');
      bool first = true;
      for (const auto& [key, item] : value.as_dict().entries) {
        if (!first) out->append(", ");
        first = false;
        AppendStringRepr(key, out);
        out->append(": ");
        LYCHEE_RETURN_IF_ERROR(AppendRepr(item, line, out));
      }
      out->push_back('}');
      return absl::OkStatus();
    }
    case Value::Kind::kObject: {
      const ObjectData& object = value.as_object();
      if (object.type == ObjectData::Type::kNamespace) {
        out->append("<Namespace ");
        LYCHEE_RETURN_IF_ERROR(AppendRepr(Value::Dict(object.attributes), line, out));
        out->push_back('>');
      } else {
        absl::StrAppend(out, "<LoopContext ", object.attributes.Find("index")->as_int(), "/",
                        object.attributes.Find("length")->as_int(), ">");
      }
      return absl::OkStatus();
    }
    case Value::Kind::kFunction:
      return Unsupported(line, absl::StrCat("printing the function '", value.as_function().name, "'"));
  }
  return absl::OkStatus();
}

// The arguments of transformers' tojson filter, which is json.dumps(ensure_ascii=False, ...).
struct JsonStyle {
  bool ensure_ascii = false;
  // No newlines when unset; else a newline and `indent` once per level before every item.
  std::optional<std::string> indent;
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};

// json.dumps's string escaping: quotes, backslashes and control characters; with ensure_ascii
// also everything outside printable ASCII, as \u escapes (surrogate pairs above the BMP).
void AppendJsonString(std::string_view text, bool ensure_ascii, std::string* out) {
  out->push_back('"');
  for (size_t pos = 0; pos < text.size();) {
    const size_t start = pos;
    const char32_t c = NextCodePoint(text, &pos);
    switch (c) {
      case '"': out->append("\\\""); continue;
      case '\\': out->append("\\\\"); continue;
      case '\n': out->append("\\n"); continue;
      case '\r': out->append("\\r"); continue;
      case '\t': out->append("\\t"); continue;
      case '\b': out->append("\\b"); continue;
      case '\f': out->append("\\f"); continue;
      default: break;
    }
    if (c < 0x20 || (ensure_ascii && c > 0x7E)) {
      if (c > 0xFFFF) {
        const char32_t offset = c - 0x10000;
        AppendHexEscape('u', 4, 0xD800 | (offset >> 10), out);
        AppendHexEscape('u', 4, 0xDC00 | (offset & 0x3FF), out);
      } else {
        AppendHexEscape('u', 4, c, out);
      }
    } else {
      out->append(text.substr(start, pos - start));
    }
  }
  out->push_back('"');
}

absl::Status AppendJson(const Value& value, const JsonStyle& style, int depth, int line, std::string* out) {
  // Before an item at `level`: the item separator, then the newline and indentation if any.
  const auto begin_item = [&](bool first, int level) {
    if (!first) out->append(style.item_separator);
    if (style.indent.has_value()) {
      out->push_back('\n');
      for (int i = 0; i < level; ++i) out->append(*style.indent);
    }
  };
  const auto close = [&](char bracket) {
    if (style.indent.has_value()) {
      out->push_back('\n');
      for (int i = 0; i < depth; ++i) out->append(*style.indent);
    }
    out->push_back(bracket);
  };
  switch (value.kind()) {
    case Value::Kind::kNone: out->append("null"); return absl::OkStatus();
    case Value::Kind::kBool: out->append(value.as_bool() ? "true" : "false"); return absl::OkStatus();
    case Value::Kind::kInt: out->append(std::to_string(value.as_int())); return absl::OkStatus();
    case Value::Kind::kFloat: {
      const double number = value.as_double();
      if (std::isnan(number)) {
        out->append("NaN");
      } else if (std::isinf(number)) {
        out->append(number > 0 ? "Infinity" : "-Infinity");
      } else {
        out->append(FloatRepr(number));
      }
      return absl::OkStatus();
    }
    case Value::Kind::kString: AppendJsonString(value.as_string(), style.ensure_ascii, out); return absl::OkStatus();
    case Value::Kind::kList: {
      const ListData& list = value.as_list();
      if (list.kind != ListKind::kList && list.kind != ListKind::kTuple) break;
      if (list.items.empty()) {
        out->append("[]");
        return absl::OkStatus();
      }
      out->push_back('[');
      for (size_t i = 0; i < list.items.size(); ++i) {
        begin_item(i == 0, depth + 1);
        LYCHEE_RETURN_IF_ERROR(AppendJson(list.items[i], style, depth + 1, line, out));
      }
      close(']');
      return absl::OkStatus();
    }
    case Value::Kind::kDict: {
      std::vector<const std::pair<std::string, Value>*> entries;
      for (const auto& entry : value.as_dict().entries) entries.push_back(&entry);
      if (entries.empty()) {
        out->append("{}");
        return absl::OkStatus();
      }
      if (style.sort_keys) {
        std::sort(entries.begin(), entries.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
      }
      out->push_back('{');
      for (size_t i = 0; i < entries.size(); ++i) {
        begin_item(i == 0, depth + 1);
        AppendJsonString(entries[i]->first, style.ensure_ascii, out);
        out->append(style.key_separator);
        LYCHEE_RETURN_IF_ERROR(AppendJson(entries[i]->second, style, depth + 1, line, out));
      }
      close('}');
      return absl::OkStatus();
    }
    default: break;
  }
  return TemplateError(line, absl::StrCat("Object of type ", TypeName(value), " is not JSON serializable"));
}

// ---------------------------------------------------------------------------------------------
// Reading JSON into Values, as json.loads does: object keys in order, a repeated key keeping its
// first place and its last value, integers kept integral.

class ValueBuilder : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool null() override { return Add(Value::None()); }
  bool boolean(bool value) override { return Add(Value::Bool(value)); }
  bool number_integer(number_integer_t value) override { return Add(Value::Int(value)); }
  bool number_unsigned(number_unsigned_t value) override {
    if (value > static_cast<number_unsigned_t>(std::numeric_limits<int64_t>::max())) {
      return Fail("an integer above 2^63 - 1");
    }
    return Add(Value::Int(static_cast<int64_t>(value)));
  }
  bool number_float(number_float_t value, const string_t& text) override {
    // nlohmann reads integers beyond 64 bits as floats; Python keeps them exact.
    if (text.find_first_of(".eE") == std::string::npos) return Fail("an integer above 2^63 - 1");
    return Add(Value::Float(value));
  }
  bool string(string_t& value) override { return Add(Value::String(std::move(value))); }
  bool binary(binary_t&) override { return Fail("binary data"); }
  bool start_object(std::size_t) override { return Open(true); }
  bool key(string_t& value) override {
    open_.back().key = std::move(value);
    return true;
  }
  bool end_object() override { return Close(); }
  bool start_array(std::size_t) override { return Open(false); }
  bool end_array() override { return Close(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& error) override {
    error_ = error.what();
    return false;
  }

  absl::StatusOr<Value> Result() && {
    if (!error_.empty()) return absl::InvalidArgumentError(error_);
    return std::move(result_);
  }

 private:
  // An array or object being read.
  struct Container {
    bool is_object;
    std::vector<Value> items;
    DictData dict;
    // The object's next key, and where each key read so far sits among its entries.
    std::string key;
    std::unordered_map<std::string, size_t> key_positions;
  };

  bool Add(Value value) {
    if (open_.empty()) {
      result_ = std::move(value);
      return true;
    }
    Container& container = open_.back();
    if (!container.is_object) {
      container.items.push_back(std::move(value));
      return true;
    }
    const auto [position, inserted] = container.key_positions.emplace(container.key, container.dict.entries.size());
    if (inserted) {
      container.dict.entries.emplace_back(std::move(container.key), std::move(value));
    } else {
      container.dict.entries[position->second].second = std::move(value);
    }
    return true;
  }
  bool Open(bool is_object) {
    // Values are printed and compared recursively: bound the nesting as json_parse.h does.
    if (open_.size() >= static_cast<size_t>(kMaxJsonDepth)) {
      return Fail(absl::StrCat("nesting deeper than ", kMaxJsonDepth, " levels"));
    }
    open_.push_back(Container{is_object, {}, {}, {}, {}});
    return true;
  }
  bool Close() {
    Container done = std::move(open_.back());
    open_.pop_back();
    return Add(done.is_object ? Value::Dict(std::move(done.dict)) : Value::List(std::move(done.items)));
  }
  bool Fail(std::string what) {
    error_ = absl::StrCat("unsupported JSON: ", what);
    return false;
  }

  std::vector<Container> open_;
  Value result_;
  std::string error_;
};

absl::StatusOr<Value> ParseJsonValue(std::string_view text) {
  ValueBuilder builder;
  nlohmann::json::sax_parse(text.begin(), text.end(), &builder, nlohmann::json::input_format_t::json, true);
  return std::move(builder).Result();
}

// ---------------------------------------------------------------------------------------------
// Lexer: the template split into data and the tokens inside {{ }} and {% %} (comments dropped),
// with Jinja's whitespace control as transformers configures it: "-" beside a delimiter strips
// the whitespace on that side, trim_blocks drops the newline after a block tag or comment, and
// lstrip_blocks strips the indentation before one ("+" keeps it).

struct Token {
  enum class Type {
    kData,
    kVariableBegin,
    kVariableEnd,
    kBlockBegin,
    kBlockEnd,
    kName,
    kString,
    kInteger,
    kFloat,
    kOperator,
    kEnd
  };
  Type type;
  // The data, name or operator; a string literal's value; a number's digits.
  std::string text;
  int line;
};

class Lexer {
 public:
  // `source` has its newlines normalized.
  explicit Lexer(std::string_view source) : source_(source) {}

  absl::StatusOr<std::vector<Token>> Tokenize() && {
    while (pos_ < source_.size()) {
      const size_t tag = FindTagStart();
      if (tag == std::string_view::npos) {
        Emit(Token::Type::kData, std::string(source_.substr(pos_)));
        break;
      }
      const char kind = source_[tag + 1];
      const char sign =
          tag + 2 < source_.size() && (source_[tag + 2] == '-' || source_[tag + 2] == '+') ? source_[tag + 2] : 0;
      std::string data(source_.substr(pos_, tag - pos_));
      if (sign == '-') {
        data = StripPython(data, std::nullopt, false, true);
      } else if (sign != '+' && kind != '{') {
        data = StripBlockIndentation(std::move(data));
      }
      if (!data.empty()) Emit(Token::Type::kData, std::move(data));
      Advance(tag);
      const int tag_line = line_;
      Advance(tag + 2 + (sign != 0 ? 1 : 0));
      if (kind == '#') {
        LYCHEE_RETURN_IF_ERROR(SkipComment(tag_line));
        continue;
      }
      Emit(kind == '{' ? Token::Type::kVariableBegin : Token::Type::kBlockBegin, "");
      LYCHEE_RETURN_IF_ERROR(TokenizeTag(kind == '{', tag_line));
    }
    Emit(Token::Type::kEnd, "");
    return std::move(tokens_);
  }

 private:
  size_t FindTagStart() const {
    for (size_t pos = source_.find('{', pos_); pos != std::string_view::npos; pos = source_.find('{', pos + 1)) {
      if (pos + 1 < source_.size() && (source_[pos + 1] == '{' || source_[pos + 1] == '%' || source_[pos + 1] == '#')) {
        return pos;
      }
    }
    return std::string_view::npos;
  }

  // lstrip_blocks: the data's last line, if it is only whitespace, goes (the first line counts
  // only where the data starts a line).
  std::string StripBlockIndentation(std::string data) const {
    const size_t newline = data.rfind('\n');
    const size_t last_line = newline == std::string::npos ? 0 : newline + 1;
    if (last_line == data.size() || (last_line == 0 && !line_starting_)) return data;
    const std::u32string indentation = DecodeUtf8(std::string_view(data).substr(last_line));
    if (!std::all_of(indentation.begin(), indentation.end(), IsPythonSpace)) return data;
    data.resize(last_line);
    return data;
  }

  absl::Status SkipComment(int tag_line) {
    const size_t end = source_.find("#}", pos_);
    if (end == std::string_view::npos) return TemplateError(tag_line, "missing end of comment tag");
    const char sign = end > pos_ ? source_[end - 1] : 0;
    Advance(end + 2);
    if (sign == '-') {
      SkipWhitespaceAfterTag();
    } else {
      line_starting_ = false;
      if (sign != '+') TrimBlock();
    }
    return absl::OkStatus();
  }

  // After a "-%}", "-}}" or "-#}": all whitespace goes.
  void SkipWhitespaceAfterTag() {
    line_starting_ = false;
    while (pos_ < source_.size()) {
      size_t next = pos_;
      if (!IsPythonSpace(NextCodePoint(source_, &next))) break;
      line_starting_ = source_[pos_] == '\n';
      Advance(next);
    }
  }

  // trim_blocks: the newline right after a block tag or comment goes.
  void TrimBlock() {
    if (pos_ < source_.size() && source_[pos_] == '\n') {
      Advance(pos_ + 1);
      line_starting_ = true;
    }
  }

  // Consumes the tag's end delimiter if it comes next.
  bool TryTagEnd(bool is_variable) {
    const std::string_view rest = source_.substr(pos_);
    const std::string_view end = is_variable ? "}}" : "%}";
    const auto starts_with = [&](std::string_view prefix) { return rest.substr(0, prefix.size()) == prefix; };
    const int line = line_;
    if (starts_with(std::string("-") + std::string(end))) {
      Advance(pos_ + 3);
      SkipWhitespaceAfterTag();
    } else if (!is_variable && starts_with("+%}")) {
      Advance(pos_ + 3);
      line_starting_ = false;
    } else if (starts_with(end)) {
      Advance(pos_ + 2);
      line_starting_ = false;
      if (!is_variable) TrimBlock();
    } else {
      return false;
    }
    tokens_.push_back(Token{is_variable ? Token::Type::kVariableEnd : Token::Type::kBlockEnd, "", line});
    return true;
  }

  absl::Status TokenizeTag(bool is_variable, int tag_line) {
    // The brackets open: inside them "}}" and "%}" are operators, as in Jinja.
    std::string open_brackets;
    while (true) {
      if (pos_ >= source_.size()) {
        return TemplateError(tag_line,
                           absl::StrCat("unexpected end of template, expected '", is_variable ? "}}" : "%}", "'"));
      }
      if (open_brackets.empty() && TryTagEnd(is_variable)) return absl::OkStatus();
      const char c = source_[pos_];
      size_t next = pos_;
      if (IsPythonSpace(NextCodePoint(source_, &next))) {
        Advance(next);
      } else if (IsAsciiDigit(c)) {
        LYCHEE_RETURN_IF_ERROR(TokenizeNumber());
      } else if (IsAsciiLetter(c) || c == '_') {
        size_t end = pos_;
        while (end < source_.size() &&
               (IsAsciiLetter(source_[end]) || IsAsciiDigit(source_[end]) || source_[end] == '_')) {
          ++end;
        }
        Emit(Token::Type::kName, std::string(source_.substr(pos_, end - pos_)));
        Advance(end);
      } else if (c == '\'' || c == '"') {
        LYCHEE_RETURN_IF_ERROR(TokenizeString());
      } else {
        LYCHEE_RETURN_IF_ERROR(TokenizeOperator(&open_brackets));
      }
    }
  }

  absl::Status TokenizeOperator(std::string* open_brackets) {
    static constexpr std::string_view kTwoCharacter[] = {"//", "**", "==", "!=", ">=", "<="};
    static constexpr std::string_view kOneCharacter = "+-/*%~[](){}><=.:|,;";
    const std::string_view two = source_.substr(pos_, 2);
    for (std::string_view op : kTwoCharacter) {
      if (two == op) {
        Emit(Token::Type::kOperator, std::string(op));
        Advance(pos_ + 2);
        return absl::OkStatus();
      }
    }
    const char c = source_[pos_];
    if (kOneCharacter.find(c) == std::string_view::npos) {
      return TemplateError(line_, absl::StrCat("unexpected character '", std::string(source_.substr(pos_, 1)), "'"));
    }
    if (c == '(' || c == '[' || c == '{') {
      open_brackets->push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
    } else if (c == ')' || c == ']' || c == '}') {
      if (open_brackets->empty() || open_brackets->back() != c) {
        return TemplateError(line_, absl::StrCat("unexpected '", std::string(1, c), "'"));
      }
      open_brackets->pop_back();
    }
    Emit(Token::Type::kOperator, std::string(1, c));
    Advance(pos_ + 1);
    return absl::OkStatus();
  }

  // Jinja's integer and float literals: digits with single underscores between them, a fraction
  // and an exponent making a float.
  absl::Status TokenizeNumber() {
    const auto digits_end = [&](size_t pos) {
      while (pos < source_.size() && (IsAsciiDigit(source_[pos]) || (source_[pos] == '_' && pos + 1 < source_.size() &&
                                                                     IsAsciiDigit(source_[pos + 1])))) {
        ++pos;
      }
      return pos;
    };
    const auto digit_at = [&](size_t pos) { return pos < source_.size() && IsAsciiDigit(source_[pos]); };
    size_t end = digits_end(pos_);
    bool is_float = false;
    if (end < source_.size() && source_[end] == '.' && digit_at(end + 1)) {
      end = digits_end(end + 1);
      is_float = true;
    }
    if (end < source_.size() && (source_[end] == 'e' || source_[end] == 'E')) {
      const size_t exponent =
          end + 1 < source_.size() && (source_[end + 1] == '+' || source_[end + 1] == '-') ? end + 2 : end + 1;
      if (digit_at(exponent)) {
        end = digits_end(exponent);
        is_float = true;
      }
    }
    std::string digits;
    for (char c : source_.substr(pos_, end - pos_)) {
      if (c != '_') digits.push_back(c);
    }
    if (!is_float && digits.size() > 1 && digits[0] == '0') {
      if (end < source_.size() && std::string_view("xXoObB").find(source_[end]) != std::string_view::npos) {
        return Unsupported(line_, "integer literal in base 2, 8 or 16");
      }
      return TemplateError(line_, absl::StrCat("leading zeros in integer literal '", digits, "'"));
    }
    if (!is_float && digits == "0" && end < source_.size() &&
        std::string_view("xXoObB").find(source_[end]) != std::string_view::npos) {
      return Unsupported(line_, "integer literal in base 2, 8 or 16");
    }
    Emit(is_float ? Token::Type::kFloat : Token::Type::kInteger, std::move(digits));
    Advance(end);
    return absl::OkStatus();
  }

  // A quoted string; its escapes mean what they mean in a Python string literal.
  absl::Status TokenizeString() {
    const char quote = source_[pos_];
    const int line = line_;
    size_t end = pos_ + 1;
    while (end < source_.size() && source_[end] != quote) end += source_[end] == '\\' ? 2 : 1;
    if (end >= source_.size()) return TemplateError(line, "unterminated string");
    LYCHEE_ASSIGN_OR_RETURN(std::string value, Unescape(source_.substr(pos_ + 1, end - pos_ - 1), line));
    Emit(Token::Type::kString, std::move(value));
    Advance(end + 1);
    return absl::OkStatus();
  }

  // Jinja decodes a string literal as Python's "unicode-escape" codec after turning non-ASCII
  // characters into backslash escapes, which the decoding turns back.
  static absl::StatusOr<std::string> Unescape(std::string_view raw, int line) {
    std::string value;
    for (size_t pos = 0; pos < raw.size();) {
      if (raw[pos] != '\\') {
        value.push_back(raw[pos++]);
        continue;
      }
      const char escape = raw[pos + 1];
      pos += 2;
      const auto hex_escape = [&](int digits) -> absl::Status {
        if (pos + digits > raw.size()) return TemplateError(line, "truncated escape in string");
        char32_t code_point = 0;
        for (int i = 0; i < digits; ++i) {
          const char h = raw[pos + i];
          const int nibble = IsAsciiDigit(h)          ? h - '0'
                             : (h >= 'a' && h <= 'f') ? h - 'a' + 10
                             : (h >= 'A' && h <= 'F') ? h - 'A' + 10
                                                      : -1;
          if (nibble < 0) return TemplateError(line, "truncated escape in string");
          code_point = code_point * 16 + static_cast<char32_t>(nibble);
        }
        if (code_point > 0x10FFFF) return TemplateError(line, "escape beyond U+10FFFF in string");
        if (code_point >= 0xD800 && code_point <= 0xDFFF) return Unsupported(line, "surrogate escape in a string");
        pos += digits;
        AppendUtf8(code_point, &value);
        return absl::OkStatus();
      };
      switch (escape) {
        case '\n': break;
        case '\\':
        case '\'':
        case '"': value.push_back(escape); break;
        case 'a': value.push_back('\a'); break;
        case 'b': value.push_back('\b'); break;
        case 'f': value.push_back('\f'); break;
        case 'n': value.push_back('\n'); break;
        case 'r': value.push_back('\r'); break;
        case 't': value.push_back('\t'); break;
        case 'v': value.push_back('\v'); break;
        case 'x': LYCHEE_RETURN_IF_ERROR(hex_escape(2)); break;
        case 'u': LYCHEE_RETURN_IF_ERROR(hex_escape(4)); break;
        case 'U': LYCHEE_RETURN_IF_ERROR(hex_escape(8)); break;
        case 'N': return Unsupported(line, "\\N{...} escape in a string");
        default:
          if (escape >= '0' && escape <= '7') {
            char32_t code_point = static_cast<char32_t>(escape - '0');
            for (int i = 0; i < 2 && pos < raw.size() && raw[pos] >= '0' && raw[pos] <= '7'; ++i) {
              code_point = code_point * 8 + static_cast<char32_t>(raw[pos++] - '0');
            }
            AppendUtf8(code_point, &value);
          } else if (static_cast<unsigned char>(escape) >= 0x80) {
            // A backslash before a non-ASCII character leaves that character's escape as text:
            // "\é" is the four characters \xe9.
            size_t start = pos - 1;
            const char32_t code_point = NextCodePoint(raw, &start);
            pos = start;
            if (code_point <= 0xFF) {
              AppendHexEscape('x', 2, code_point, &value);
            } else if (code_point <= 0xFFFF) {
              AppendHexEscape('u', 4, code_point, &value);
            } else {
              AppendHexEscape('U', 8, code_point, &value);
            }
          } else {
            // Unknown escapes stay as written.
            value.push_back('\\');
            value.push_back(escape);
          }
      }
    }
    return value;
  }

  void Emit(Token::Type type, std::string text) { tokens_.push_back(Token{type, std::move(text), line_}); }

  void Advance(size_t new_pos) {
    line_ += static_cast<int>(std::count(source_.begin() + static_cast<std::ptrdiff_t>(pos_),
                                         source_.begin() + static_cast<std::ptrdiff_t>(new_pos), '\n'));
    pos_ = new_pos;
  }

  std::string_view source_;
  size_t pos_ = 0;
  int line_ = 1;
  // Whether what was consumed last ended a line; at the start it has.
  bool line_starting_ = true;
  std::vector<Token> tokens_;
};

// ---------------------------------------------------------------------------------------------
// The syntax tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kConstant,     // constant
    kName,         // the variable `name`
    kList,         // [operands...]
    kTuple,        // (operands...)
    kDict,         // {operands[0]: operands[1], operands[2]: operands[3], ...}
    kAttribute,    // operands[0].name
    kItem,         // operands[0][operands[1]]
    kSlice,        // operands[0][operands[1]:operands[2]:operands[3]], each bound possibly null
    kCall,         // operands[0](operands[1...], keywords)
    kFilter,       // operands[0] | name(operands[1...], keywords); operands[0] is null in the filter
                   // of a {% set %} block, which applies to the block's text
    kTest,         // operands[0] is name(operands[1...], keywords)
    kNot,          // not operands[0]
    kNegate,       // -operands[0]
    kPositive,     // +operands[0]
    kBinary,       // operands[0] `name` operands[1], name one of + - * / // % ** ~
    kAnd,          // operands[0] and operands[1]
    kOr,           // operands[0] or operands[1]
    kCompare,      // operands[0] comparisons[0] operands[1] comparisons[1] operands[2] ...
    kConditional,  // operands[0] if operands[1] else operands[2] (null without else)
  };
  Expr(Kind kind, int line, std::string name) : kind(kind), line(line), name(std::move(name)) {}

  Kind kind;
  int line;
  std::string name;
  Value constant;
  std::vector<ExprPtr> operands;
  // kCompare's operators: == != < <= > >= in, and "not in".
  std::vector<std::string> comparisons;
  std::vector<std::pair<std::string, ExprPtr>> keywords;
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Stmt {
  enum class Kind {
    kData,      // text, as is
    kPrint,     // {{ expr }}
    kIf,        // branches: the if and elif conditions with their bodies; else_body
    kFor,       // for targets in expr [if condition]: body; else_body when nothing was iterated
    kSet,       // set targets = expr; with `attribute`, set targets[0].attribute = expr (a namespace)
    kSetBlock,  // set targets[0] [| filter]: the text body renders
    kBreak,
    kContinue,
    kScope,  // body in a scope of its own: transformers' {% generation %} block
    kMacro,  // macro `text`(targets, with defaults): body
  };
  Stmt(Kind kind, int line) : kind(kind), line(line) {}

  Kind kind;
  int line;
  std::string text;
  ExprPtr expr;
  ExprPtr condition;
  ExprPtr filter;
  std::vector<std::string> targets;
  std::string attribute;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body;
  Body else_body;
  // kMacro: each parameter's default value, null where it has none.
  std::vector<ExprPtr> defaults;
};

// ---------------------------------------------------------------------------------------------
// Builtins: the filters, tests, methods and globals of the subset, as jinja2/filters.py,
// jinja2/tests.py and Python define them.

// Binds a call's arguments to a Python function's parameters: positional ones in order, then
// keywords by name; one entry per parameter, empty where the call passed nothing.
absl::StatusOr<std::vector<std::optional<Value>>> BindArguments(const CallArgs& args, absl::string_view function,
                                                                std::initializer_list<std::string_view> parameters) {
  if (args.positional.size() > parameters.size()) {
    return TemplateError(args.line, absl::StrCat(function, "() takes at most ", parameters.size(), " arguments (",
                                               args.positional.size(), " given)"));
  }
  std::vector<std::optional<Value>> bound(parameters.size());
  for (size_t i = 0; i < args.positional.size(); ++i) bound[i] = args.positional[i];
  for (const auto& [name, value] : args.keywords) {
    const auto parameter = std::find(parameters.begin(), parameters.end(), name);
    if (parameter == parameters.end()) {
      return TemplateError(args.line, absl::StrCat(function, "() got an unexpected keyword argument '", name, "'"));
    }
    auto& slot = bound[static_cast<size_t>(parameter - parameters.begin())];
    if (slot.has_value()) {
      return TemplateError(args.line, absl::StrCat(function, "() got multiple values for argument '", name, "'"));
    }
    slot = value;
  }
  return bound;
}

bool IsNoneOrAbsent(const std::optional<Value>& value) { return !value.has_value() || value->is(Value::Kind::kNone); }

absl::StatusOr<std::string> RequireString(const std::optional<Value>& value, absl::string_view what, int line) {
  if (!value.has_value()) return TemplateError(line, absl::StrCat(what, " is missing"));
  if (!value->is(Value::Kind::kString)) {
    return TemplateError(line, absl::StrCat(what, " must be a string, not ", TypeName(*value)));
  }
  return value->as_string();
}

absl::StatusOr<int64_t> RequireInt(const std::optional<Value>& value, absl::string_view what, int line) {
  if (!value.has_value()) return TemplateError(line, absl::StrCat(what, " is missing"));
  if (!value->is_integral()) {
    return TemplateError(line, absl::StrCat(what, " must be an integer, not ", TypeName(*value)));
  }
  return value->as_int();
}

// --- Arithmetic, with Python's semantics: floor division and modulo round toward negative
// infinity, / always gives a float, and integers do not wrap (Python's are unbounded: an
// overflow here is an error).

absl::Status OverflowError(int line) { return Unsupported(line, "integer arithmetic beyond 64 bits"); }

absl::StatusOr<Value> IntegerArithmetic(char op, int64_t a, int64_t b, int line) {
  int64_t result = 0;
  switch (op) {
    case '+':
      if (__builtin_add_overflow(a, b, &result)) return OverflowError(line);
      return Value::Int(result);
    case '-':
      if (__builtin_sub_overflow(a, b, &result)) return OverflowError(line);
      return Value::Int(result);
    case '*':
      if (__builtin_mul_overflow(a, b, &result)) return OverflowError(line);
      return Value::Int(result);
    case '/':  // floor division
    case '%': {
      if (b == 0) return TemplateError(line, "integer division or modulo by zero");
      if (a == std::numeric_limits<int64_t>::min() && b == -1) return OverflowError(line);
      int64_t quotient = a / b;
      int64_t remainder = a % b;
      if (remainder != 0 && ((remainder < 0) != (b < 0))) {
        quotient -= 1;
        remainder += b;
      }
      return Value::Int(op == '/' ? quotient : remainder);
    }
    default: break;
  }
  return Value::Int(0);
}

// float_divmod of CPython's floatobject.c.
std::pair<double, double> FloatDivmod(double a, double b) {
  double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0.0) {
    if ((b < 0) != (mod < 0)) {
      mod += b;
      div -= 1.0;
    }
  } else {
    mod = std::copysign(0.0, b);
  }
  double floor_div;
  if (div != 0.0) {
    floor_div = std::floor(div);
    if (div - floor_div > 0.5) floor_div += 1.0;
  } else {
    floor_div = std::copysign(0.0, a / b);
  }
  return {floor_div, mod};
}

absl::StatusOr<Value> Power(const Value& base, const Value& exponent, int line) {
  if (base.is_integral() && exponent.is_integral() && exponent.as_int() >= 0) {
    int64_t result = 1;
    int64_t factor = base.as_int();
    for (int64_t e = exponent.as_int(); e > 0; e >>= 1) {
      if ((e & 1) != 0 && __builtin_mul_overflow(result, factor, &result)) return OverflowError(line);
      if (e > 1 && __builtin_mul_overflow(factor, factor, &factor)) return OverflowError(line);
    }
    return Value::Int(result);
  }
  const double a = base.as_double();
  const double b = exponent.as_double();
  if (a == 0.0 && b < 0.0) return TemplateError(line, "0.0 cannot be raised to a negative power");
  if (a < 0.0 && b != std::floor(b)) {
    return Unsupported(line, "a negative number raised to a fractional power (a complex number)");
  }
  const double result = std::pow(a, b);
  if (std::isinf(result) && std::isfinite(a) && std::isfinite(b)) {
    return TemplateError(line, "numerical result out of range");
  }
  return Value::Float(result);
}

// markupsafe.escape of a plain string.
std::string EscapeHtml(std::string_view text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '\'': escaped += "&#39;"; break;
      case '"': escaped += "&#34;"; break;
      default: escaped.push_back(c);
    }
  }
  return escaped;
}

// A safe string's methods, items and most filters give safe strings in Python, which escape
// what is later added to them; this subset only prints, concatenates with ~, compares, measures
// and serializes them.
absl::Status RejectMarkup(const Value& value, absl::string_view what, int line) {
  if (value.is_markup()) return Unsupported(line, absl::StrCat(what, " of a safe string"));
  return absl::OkStatus();
}

// Sequence repetition ("ab" * 3, [1] * 2); bounded so that a template cannot exhaust memory.
absl::StatusOr<Value> Repeat(const Value& sequence, int64_t times, int line) {
  constexpr int64_t kMaxRepeatedSize = int64_t{1} << 24;
  const int64_t count = std::max<int64_t>(times, 0);
  if (sequence.is(Value::Kind::kString)) {
    const std::string& text = sequence.as_string();
    if (count > 0 && static_cast<int64_t>(text.size()) > kMaxRepeatedSize / count) {
      return Unsupported(line, "repetition beyond 16 MiB");
    }
    std::string repeated;
    for (int64_t i = 0; i < count; ++i) repeated += text;
    return Value::String(std::move(repeated));
  }
  const ListData& list = sequence.as_list();
  if (count > 0 && static_cast<int64_t>(list.items.size()) > kMaxRepeatedSize / count) {
    return Unsupported(line, "repetition beyond 16 Mi items");
  }
  std::vector<Value> repeated;
  for (int64_t i = 0; i < count; ++i) repeated.insert(repeated.end(), list.items.begin(), list.items.end());
  return Value::List(std::move(repeated), list.kind);
}

bool IsPlainSequence(const Value& value) {
  return value.is(Value::Kind::kList) &&
         (value.as_list().kind == ListKind::kList || value.as_list().kind == ListKind::kTuple);
}

// + - * / // % ** between two values.
absl::StatusOr<Value> Arithmetic(absl::string_view op, const Value& a, const Value& b, int line) {
  if (a.is(Value::Kind::kUndefined)) return UndefinedError(line, a);
  if (b.is(Value::Kind::kUndefined)) return UndefinedError(line, b);
  if (a.is_number() && b.is_number()) {
    if (op == "**") return Power(a, b, line);
    if (op == "/") {
      if (b.as_double() == 0.0) return TemplateError(line, "division by zero");
      return Value::Float(a.as_double() / b.as_double());
    }
    if (a.is_integral() && b.is_integral()) {
      return IntegerArithmetic(op == "//" ? '/' : op[0], a.as_int(), b.as_int(), line);
    }
    const double x = a.as_double();
    const double y = b.as_double();
    if (op == "+") return Value::Float(x + y);
    if (op == "-") return Value::Float(x - y);
    if (op == "*") return Value::Float(x * y);
    if (y == 0.0) return TemplateError(line, "float division or modulo by zero");
    const auto [quotient, remainder] = FloatDivmod(x, y);
    return Value::Float(op == "//" ? quotient : remainder);
  }
  if (op == "+" && a.is(Value::Kind::kString) && b.is(Value::Kind::kString)) {
    // A safe string escapes the plain one it is added to, and the sum is safe.
    if (a.is_markup() || b.is_markup()) {
      return Value::Markup((a.is_markup() ? a.as_string() : EscapeHtml(a.as_string())) +
                           (b.is_markup() ? b.as_string() : EscapeHtml(b.as_string())));
    }
    return Value::String(a.as_string() + b.as_string());
  }
  if (a.is_markup() || b.is_markup()) return Unsupported(line, absl::StrCat("'", op, "' on a safe string"));
  if (op == "+" && IsPlainSequence(a) && IsPlainSequence(b) && a.as_list().kind == b.as_list().kind) {
    std::vector<Value> items = a.as_list().items;
    items.insert(items.end(), b.as_list().items.begin(), b.as_list().items.end());
    return Value::List(std::move(items), a.as_list().kind);
  }
  if (op == "*" && (a.is(Value::Kind::kString) || IsPlainSequence(a)) && b.is_integral()) {
    return Repeat(a, b.as_int(), line);
  }
  if (op == "*" && a.is_integral() && (b.is(Value::Kind::kString) || IsPlainSequence(b))) {
    return Repeat(b, a.as_int(), line);
  }
  if (op == "%" && a.is(Value::Kind::kString)) return Unsupported(line, "string formatting with '%'");
  return TemplateError(
      line, absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(a), "' and '", TypeName(b), "'"));
}

// --- Strings.

// Python's slicing of a sequence of `length` items: the indices start:stop:step selects.
absl::StatusOr<std::vector<int64_t>> SliceIndices(int64_t length, const std::optional<int64_t>& start,
                                                  const std::optional<int64_t>& stop,
                                                  const std::optional<int64_t>& step, int line) {
  const int64_t stride = step.value_or(1);
  if (stride == 0) return TemplateError(line, "slice step cannot be zero");
  const int64_t lower = stride > 0 ? 0 : -1;
  const int64_t upper = stride > 0 ? length : length - 1;
  const auto clamp = [&](const std::optional<int64_t>& bound, int64_t absent) {
    if (!bound.has_value()) return absent;
    return *bound < 0 ? std::max(*bound + length, lower) : std::min(*bound, upper);
  };
  const int64_t first = clamp(start, stride > 0 ? lower : upper);
  const int64_t end = clamp(stop, stride > 0 ? upper : lower);
  std::vector<int64_t> indices;
  for (int64_t i = first; stride > 0 ? i < end : i > end; i += stride) indices.push_back(i);
  return indices;
}

// str.split(sep, maxsplit): without a separator, runs of whitespace split and the ends go.
std::vector<Value> SplitString(std::string_view text, const std::optional<std::string>& separator, int64_t max_splits) {
  std::vector<Value> parts;
  if (separator.has_value()) {
    size_t start = 0;
    for (int64_t splits = 0; max_splits < 0 || splits < max_splits; ++splits) {
      const size_t found = text.find(*separator, start);
      if (found == std::string_view::npos) break;
      parts.push_back(Value::String(std::string(text.substr(start, found - start))));
      start = found + separator->size();
    }
    parts.push_back(Value::String(std::string(text.substr(start))));
    return parts;
  }
  const std::u32string code_points = DecodeUtf8(text);
  size_t pos = 0;
  int64_t splits = 0;
  while (true) {
    while (pos < code_points.size() && IsPythonSpace(code_points[pos])) ++pos;
    if (pos == code_points.size()) break;
    if (max_splits >= 0 && splits == max_splits) {
      // The rest, trailing whitespace included, is the last part.
      parts.push_back(Value::String(EncodeUtf8(std::u32string_view(code_points).substr(pos))));
      break;
    }
    const size_t start = pos;
    while (pos < code_points.size() && !IsPythonSpace(code_points[pos])) ++pos;
    parts.push_back(Value::String(EncodeUtf8(std::u32string_view(code_points).substr(start, pos - start))));
    ++splits;
  }
  return parts;
}

// str.replace(old, new, count): an empty `old` inserts `new` around every character.
std::string ReplaceString(std::string_view text, std::string_view old, std::string_view replacement, int64_t count) {
  std::string result;
  int64_t done = 0;
  if (old.empty()) {
    for (size_t pos = 0; pos <= text.size();) {
      if (count < 0 || done < count) {
        result.append(replacement);
        ++done;
      }
      if (pos == text.size()) break;
      const size_t start = pos;
      NextCodePoint(text, &pos);
      result.append(text.substr(start, pos - start));
    }
    return result;
  }
  size_t start = 0;
  while (count < 0 || done < count) {
    const size_t found = text.find(old, start);
    if (found == std::string_view::npos) break;
    result.append(text.substr(start, found - start));
    result.append(replacement);
    start = found + old.size();
    ++done;
  }
  result.append(text.substr(start));
  return result;
}

// Case conversions follow Unicode's full case mappings in Python ("ß".upper() == "SS", final
// sigma); only ASCII text is converted here, anything else is refused rather than mapped
// differently.
enum class CaseConversion { kUpper, kLower, kTitle, kCapitalize, kTitleWords };

absl::StatusOr<std::string> ConvertCase(std::string_view text, CaseConversion conversion, int line) {
  if (!IsAscii(text)) return Unsupported(line, "case conversion of non-ASCII text");
  std::string result(text);
  // kTitle: whether the previous character is a letter; kTitleWords: whether it separates words.
  bool previous_cased = false;
  bool after_separator = true;
  for (size_t i = 0; i < result.size(); ++i) {
    char& c = result[i];
    switch (conversion) {
      case CaseConversion::kUpper: c = AsciiUpper(c); break;
      case CaseConversion::kLower: c = AsciiLower(c); break;
      case CaseConversion::kCapitalize: c = i == 0 ? AsciiUpper(c) : AsciiLower(c); break;
      case CaseConversion::kTitle:
        // str.title(): a letter after a letter is lowered, any other is raised.
        c = previous_cased ? AsciiLower(c) : AsciiUpper(c);
        previous_cased = IsAsciiLetter(c);
        break;
      case CaseConversion::kTitleWords: {
        // Jinja's title filter: each word, split at runs of whitespace and "-({[<", gets its
        // first character raised and the rest lowered.
        const bool separator = c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1C && c <= 0x1F) ||
                               std::string_view("-({[<").find(c) != std::string_view::npos;
        c = after_separator ? AsciiUpper(c) : AsciiLower(c);
        after_separator = separator;
        break;
      }
    }
  }
  return result;
}

// str.islower() / str.isupper() of ASCII text: some cased character, none of the other case.
absl::StatusOr<bool> HasOnlyCase(std::string_view text, bool lower, int line) {
  if (!IsAscii(text)) return Unsupported(line, "case test of non-ASCII text");
  bool cased = false;
  for (char c : text) {
    if (!IsAsciiLetter(c)) continue;
    cased = true;
    if ((AsciiLower(c) == c) != lower) return false;
  }
  return cased;
}

// --- Attributes, items and methods.

// The methods of Python's str, dict and list, so that a method outside the subset is an error
// naming it rather than an undefined attribute.
constexpr std::string_view kStringMethods[] = {
    "capitalize",   "casefold",   "center",    "count",       "encode",    "endswith",     "expandtabs",   "find",
    "format",       "format_map", "index",     "isalnum",     "isalpha",   "isascii",      "isdecimal",    "isdigit",
    "isidentifier", "islower",    "isnumeric", "isprintable", "isspace",   "istitle",      "isupper",      "join",
    "ljust",        "lower",      "lstrip",    "maketrans",   "partition", "removeprefix", "removesuffix", "replace",
    "rfind",        "rindex",     "rjust",     "rpartition",  "rsplit",    "rstrip",       "split",        "splitlines",
    "startswith",   "strip",      "swapcase",  "title",       "translate", "upper",        "zfill"};
constexpr std::string_view kDictMethods[] = {"clear", "copy",    "fromkeys",   "get",    "items", "keys",
                                             "pop",   "popitem", "setdefault", "update", "values"};
constexpr std::string_view kListMethods[] = {"append", "clear", "copy",   "count",   "extend", "index",
                                             "insert", "pop",   "remove", "reverse", "sort"};

template <size_t N>
bool IsOneOf(std::string_view name, const std::string_view (&names)[N]) {
  return std::find(std::begin(names), std::end(names), name) != std::end(names);
}

absl::StatusOr<Value> CallStringMethod(const std::string& self, const std::string& method, const CallArgs& args) {
  const std::string function = absl::StrCat("str.", method);
  if (method == "strip" || method == "lstrip" || method == "rstrip") {
    LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, function, {"chars"}));
    std::optional<std::u32string> chars;
    if (!IsNoneOrAbsent(bound[0])) {
      LYCHEE_ASSIGN_OR_RETURN(const std::string text, RequireString(bound[0], "the characters to strip", args.line));
      chars = DecodeUtf8(text);
    }
    return Value::String(StripPython(self, chars, method != "rstrip", method != "lstrip"));
  }
  if (method == "split") {
    LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, function, {"sep", "maxsplit"}));
    std::optional<std::string> separator;
    if (!IsNoneOrAbsent(bound[0])) {
      LYCHEE_ASSIGN_OR_RETURN(separator, RequireString(bound[0], "the separator", args.line));
      if (separator->empty()) return TemplateError(args.line, "empty separator");
    }
    int64_t max_splits = -1;
    if (bound[1].has_value()) {
      LYCHEE_ASSIGN_OR_RETURN(max_splits, RequireInt(bound[1], "maxsplit", args.line));
    }
    return Value::List(SplitString(self, separator, max_splits));
  }
  if (method == "startswith" || method == "endswith") {
    LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, function, {"affix", "start", "end"}));
    if (bound[1].has_value() || bound[2].has_value()) {
      return Unsupported(args.line, absl::StrCat(function, " with start or end"));
    }
    std::vector<Value> affixes = {bound[0].value_or(Value())};
    if (bound[0].has_value() && bound[0]->is(Value::Kind::kList) && bound[0]->as_list().kind == ListKind::kTuple) {
      affixes = bound[0]->as_list().items;
    }
    for (const Value& affix : affixes) {
      LYCHEE_ASSIGN_OR_RETURN(const std::string text,
                              RequireString(affix, absl::StrCat(function, "'s argument"), args.line));
      const bool matches = text.size() <= self.size() &&
                           (method == "startswith" ? self.compare(0, text.size(), text) == 0
                                                   : self.compare(self.size() - text.size(), text.size(), text) == 0);
      if (matches) return Value::Bool(true);
    }
    return Value::Bool(false);
  }
  if (method == "upper" || method == "lower" || method == "title" || method == "capitalize") {
    LYCHEE_RETURN_IF_ERROR(BindArguments(args, function, {}).status());
    const CaseConversion conversion = method == "upper"   ? CaseConversion::kUpper
                                      : method == "lower" ? CaseConversion::kLower
                                      : method == "title" ? CaseConversion::kTitle
                                                          : CaseConversion::kCapitalize;
    LYCHEE_ASSIGN_OR_RETURN(std::string converted, ConvertCase(self, conversion, args.line));
    return Value::String(std::move(converted));
  }
  if (method == "replace") {
    LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, function, {"old", "new", "count"}));
    LYCHEE_ASSIGN_OR_RETURN(const std::string old, RequireString(bound[0], "replace's old text", args.line));
    LYCHEE_ASSIGN_OR_RETURN(const std::string replacement, RequireString(bound[1], "replace's new text", args.line));
    int64_t count = -1;
    if (bound[2].has_value()) {
      LYCHEE_ASSIGN_OR_RETURN(count, RequireInt(bound[2], "replace's count", args.line));
    }
    return Value::String(ReplaceString(self, old, replacement, count));
  }
  return Unsupported(args.line, absl::StrCat("string method '", method, "'"));
}

Value ItemTuple(const std::string& key, const Value& value) {
  return Value::List({Value::String(key), value}, ListKind::kTuple);
}

absl::StatusOr<Value> CallDictMethod(const Value& self, const std::string& method, const CallArgs& args) {
  const std::string function = absl::StrCat("dict.", method);
  const DictData& dict = self.as_dict();
  if (method == "get") {
    LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, function, {"key", "default"}));
    if (!bound[0].has_value()) return TemplateError(args.line, "dict.get() needs a key");
    const Value* found = bound[0]->is(Value::Kind::kString) ? dict.Find(bound[0]->as_string()) : nullptr;
    if (found != nullptr) return *found;
    return bound[1].value_or(Value::None());
  }
  if (method == "items" || method == "keys" || method == "values") {
    LYCHEE_RETURN_IF_ERROR(BindArguments(args, function, {}).status());
    std::vector<Value> view;
    for (const auto& [key, value] : dict.entries) {
      view.push_back(method == "items" ? ItemTuple(key, value) : method == "keys" ? Value::String(key) : value);
    }
    return Value::List(std::move(view), ListKind::kView);
  }
  return Unsupported(args.line, absl::StrCat("dict method '", method, "'"));
}

// `object`'s method `name` as a bound function, where the object's Python type has that method.
std::optional<Value> Method(const Value& object, const std::string& name) {
  if (object.is(Value::Kind::kString) && IsOneOf(name, kStringMethods)) {
    return MakeFunction(absl::StrCat("str.", name), [object, name](const CallArgs& args) -> absl::StatusOr<Value> {
      LYCHEE_RETURN_IF_ERROR(RejectMarkup(object, absl::StrCat("method '", name, "'"), args.line));
      return CallStringMethod(object.as_string(), name, args);
    });
  }
  if (object.is(Value::Kind::kDict) && IsOneOf(name, kDictMethods)) {
    return MakeFunction(absl::StrCat("dict.", name),
                        [object, name](const CallArgs& args) { return CallDictMethod(object, name, args); });
  }
  if (IsPlainSequence(object) && IsOneOf(name, kListMethods)) {
    return MakeFunction(absl::StrCat("list.", name), [name](const CallArgs& args) -> absl::StatusOr<Value> {
      return Unsupported(args.line, absl::StrCat("list method '", name, "'"));
    });
  }
  return std::nullopt;
}

std::string MissingAttribute(const Value& object, absl::string_view name) {
  return absl::StrCat("'", TypeName(object), " object' has no attribute '", name, "'");
}

// Jinja's getattr (obj.name): the Python attribute (a method) first, else the item.
absl::StatusOr<Value> GetAttribute(const Value& object, const std::string& name, int line) {
  // The sandbox refuses Python's internals.
  if (name.substr(0, 2) == "__") return Unsupported(line, absl::StrCat("attribute '", name, "'"));
  if (object.is(Value::Kind::kUndefined)) return UndefinedError(line, object);
  if (std::optional<Value> method = Method(object, name)) return *method;
  const Value* found = nullptr;
  if (object.is(Value::Kind::kDict)) found = object.as_dict().Find(name);
  if (object.is(Value::Kind::kObject)) found = object.as_object().attributes.Find(name);
  if (found != nullptr) return *found;
  return Value::Undefined(MissingAttribute(object, name));
}

// Jinja's getitem (obj[key]): the item first, else for a string key the attribute. What Python
// would refuse with a TypeError or a LookupError is undefined, as in Jinja.
absl::StatusOr<Value> GetItem(const Value& object, const Value& key, int line) {
  if (object.is(Value::Kind::kUndefined)) return UndefinedError(line, object);
  if (key.is_integral()) LYCHEE_RETURN_IF_ERROR(RejectMarkup(object, "an item", line));
  if (key.is_integral() && (IsPlainSequence(object) || object.is(Value::Kind::kString))) {
    int64_t index = key.as_int();
    if (object.is(Value::Kind::kString)) {
      const std::u32string code_points = DecodeUtf8(object.as_string());
      const auto length = static_cast<int64_t>(code_points.size());
      if (index < 0) index += length;
      if (index >= 0 && index < length) {
        return Value::String(EncodeUtf8(code_points.substr(static_cast<size_t>(index), 1)));
      }
    } else {
      const std::vector<Value>& items = object.as_list().items;
      const auto length = static_cast<int64_t>(items.size());
      if (index < 0) index += length;
      if (index >= 0 && index < length) return items[static_cast<size_t>(index)];
    }
    return Value::Undefined(absl::StrCat(TypeName(object), " object has no element ", key.as_int()));
  }
  if (!key.is(Value::Kind::kString)) {
    return Value::Undefined(absl::StrCat(TypeName(object), " object has no such element"));
  }
  const std::string& name = key.as_string();
  if (object.is(Value::Kind::kDict)) {
    if (const Value* found = object.as_dict().Find(name)) return *found;
  }
  return GetAttribute(object, name, line);
}

// An item's attribute as selectattr, map and join look it up: a dotted path of item lookups,
// where parts that are numbers index sequences.
absl::StatusOr<Value> AttributePath(const Value& item, std::string_view path, int line) {
  Value value = item;
  for (absl::string_view part : absl::StrSplit(absl::string_view(path.data(), path.size()), '.')) {
    int64_t index = 0;
    const auto [end, error] = std::from_chars(part.data(), part.data() + part.size(), index);
    const bool is_index = error == std::errc() && end == part.data() + part.size();
    LYCHEE_ASSIGN_OR_RETURN(value,
                            GetItem(value, is_index ? Value::Int(index) : Value::String(std::string(part)), line));
  }
  return value;
}

// --- Tests (`x is name(args)`).

using TestFunction = absl::StatusOr<bool> (*)(const Value& value, const CallArgs& args);

// The single argument of a test such as `equalto`.
absl::StatusOr<Value> TestArgument(const CallArgs& args, absl::string_view test) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, test, {"other"}));
  if (!bound[0].has_value()) return TemplateError(args.line, absl::StrCat("the test '", test, "' needs an argument"));
  return *bound[0];
}

absl::StatusOr<bool> NoArguments(const CallArgs& args, absl::string_view test) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, test, {}).status());
  return true;
}

absl::StatusOr<bool> IsDivisibleBy(const Value& value, const Value& divisor, int line) {
  LYCHEE_ASSIGN_OR_RETURN(const Value remainder, Arithmetic("%", value, divisor, line));
  return Equals(remainder, Value::Int(0), line);
}

template <Value::Kind kind>
absl::StatusOr<bool> TestKind(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(NoArguments(args, "kind test").status());
  return value.is(kind);
}

absl::StatusOr<bool> TestDefined(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(NoArguments(args, "defined").status());
  return !value.is(Value::Kind::kUndefined);
}

absl::StatusOr<bool> TestBooleanValue(const Value& value, bool expected) {
  return value.is(Value::Kind::kBool) && value.as_bool() == expected;
}

absl::StatusOr<bool> TestIterable(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(NoArguments(args, "iterable").status());
  switch (value.kind()) {
    case Value::Kind::kUndefined:  // Jinja's Undefined iterates as empty
    case Value::Kind::kString:
    case Value::Kind::kList:
    case Value::Kind::kDict: return true;
    case Value::Kind::kObject: return value.as_object().type == ObjectData::Type::kLoop;
    default: return false;
  }
}

// Jinja's test_sequence: has a len() and items (Undefined has both).
absl::StatusOr<bool> TestSequence(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(NoArguments(args, "sequence").status());
  return value.is(Value::Kind::kUndefined) || value.is(Value::Kind::kString) || value.is(Value::Kind::kDict) ||
         IsPlainSequence(value);
}

absl::StatusOr<bool> TestSameAs(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const Value other, TestArgument(args, "sameas"));
  // Python's `is`: None, True and False are singletons; containers have an identity.
  for (const Value* singleton : {&value, &other}) {
    if (singleton->is(Value::Kind::kNone) || singleton->is(Value::Kind::kBool)) {
      return value.kind() == other.kind() && (value.is(Value::Kind::kNone) || value.as_bool() == other.as_bool());
    }
  }
  if (value.address() != nullptr && other.address() != nullptr) return value.address() == other.address();
  return Unsupported(args.line, "'sameas' of numbers or strings (their identity is Python's)");
}

const std::map<std::string_view, TestFunction>& Tests() {
  static const auto* const tests = new std::map<std::string_view, TestFunction>{
      {"defined", TestDefined},
      {"undefined",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_ASSIGN_OR_RETURN(const bool defined, TestDefined(v, a));
         return !defined;
       }},
      {"none", TestKind<Value::Kind::kNone>},
      {"string", TestKind<Value::Kind::kString>},
      {"mapping", TestKind<Value::Kind::kDict>},
      {"float", TestKind<Value::Kind::kFloat>},
      {"integer", TestKind<Value::Kind::kInt>},
      {"boolean", TestKind<Value::Kind::kBool>},
      {"number",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "number").status());
         return v.is_number();
       }},
      {"callable",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "callable").status());
         return v.is(Value::Kind::kFunction);
       }},
      {"true",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "true").status());
         return TestBooleanValue(v, true);
       }},
      {"false",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "false").status());
         return TestBooleanValue(v, false);
       }},
      {"iterable", TestIterable},
      {"sequence", TestSequence},
      {"sameas", TestSameAs},
      {"odd",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "odd").status());
         LYCHEE_ASSIGN_OR_RETURN(const Value remainder, Arithmetic("%", v, Value::Int(2), a.line));
         return Equals(remainder, Value::Int(1), a.line);
       }},
      {"even",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "even").status());
         return IsDivisibleBy(v, Value::Int(2), a.line);
       }},
      {"divisibleby",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_ASSIGN_OR_RETURN(const Value divisor, TestArgument(a, "divisibleby"));
         return IsDivisibleBy(v, divisor, a.line);
       }},
      {"lower",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "lower").status());
         LYCHEE_ASSIGN_OR_RETURN(const std::string text, Str(v, a.line));
         return HasOnlyCase(text, true, a.line);
       }},
      {"upper",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_RETURN_IF_ERROR(NoArguments(a, "upper").status());
         LYCHEE_ASSIGN_OR_RETURN(const std::string text, Str(v, a.line));
         return HasOnlyCase(text, false, a.line);
       }},
      {"in",
       [](const Value& v, const CallArgs& a) -> absl::StatusOr<bool> {
         LYCHEE_ASSIGN_OR_RETURN(const Value container, TestArgument(a, "in"));
         return Contains(container, v, a.line);
       }},
  };
  return *tests;
}

// The comparison tests (equalto, ==, gt, >, ...) map to the comparison operators.
std::optional<std::string_view> ComparisonTestOperator(std::string_view test) {
  static const auto* const operators = new std::map<std::string_view, std::string_view>{
      {"eq", "=="}, {"equalto", "=="},    {"==", "=="}, {"ne", "!="}, {"!=", "!="},
      {"lt", "<"},  {"lessthan", "<"},    {"<", "<"},   {"le", "<="}, {"<=", "<="},
      {"gt", ">"},  {"greaterthan", ">"}, {">", ">"},   {"ge", ">="}, {">=", ">="}};
  const auto found = operators->find(test);
  if (found == operators->end()) return std::nullopt;
  return found->second;
}

bool IsSupportedTest(std::string_view name) {
  return Tests().count(name) > 0 || ComparisonTestOperator(name).has_value();
}

absl::StatusOr<bool> Compare(std::string_view op, const Value& left, const Value& right, int line) {
  if (op == "==" || op == "!=") {
    LYCHEE_ASSIGN_OR_RETURN(const bool equal, Equals(left, right, line));
    return equal == (op == "==");
  }
  if (op == "in" || op == "not in") {
    LYCHEE_ASSIGN_OR_RETURN(const bool contained, Contains(right, left, line));
    return contained == (op == "in");
  }
  return OrderedCompare(left, right, ToAbsl(op), line);
}

absl::StatusOr<bool> ApplyTest(std::string_view name, const Value& value, const CallArgs& args) {
  if (const std::optional<std::string_view> op = ComparisonTestOperator(name)) {
    LYCHEE_ASSIGN_OR_RETURN(const Value other, TestArgument(args, ToAbsl(name)));
    return Compare(*op, value, other, args.line);
  }
  return Tests().at(name)(value, args);
}

// --- Filters (`x | name(args)`).

using FilterFunction = absl::StatusOr<Value> (*)(const Value& value, const CallArgs& args);

absl::StatusOr<Value> ApplyFilter(std::string_view name, const Value& value, const CallArgs& args);

// Python's int() and float() of a string: surrounding whitespace allowed, and underscores
// between digits.
std::optional<std::string> PythonNumberText(std::string_view text) {
  const std::string stripped = StripPython(text, std::nullopt, true, true);
  std::string digits;
  for (size_t i = 0; i < stripped.size(); ++i) {
    const char c = stripped[i];
    if (c == '_') {
      if (i == 0 || i + 1 == stripped.size() || !IsAsciiDigit(stripped[i - 1]) || !IsAsciiDigit(stripped[i + 1])) {
        return std::nullopt;
      }
      continue;
    }
    digits.push_back(c);
  }
  if (digits.empty() || !IsAscii(digits)) return std::nullopt;
  return digits;
}

std::optional<int64_t> ParsePythonInt(std::string_view text) {
  const std::optional<std::string> digits = PythonNumberText(text);
  if (!digits.has_value()) return std::nullopt;
  std::string_view rest = *digits;
  if (rest[0] == '+') rest.remove_prefix(1);
  int64_t value = 0;
  const auto [end, error] = std::from_chars(rest.data(), rest.data() + rest.size(), value);
  if (error != std::errc() || end != rest.data() + rest.size()) return std::nullopt;
  return value;
}

std::optional<double> ParsePythonFloat(std::string_view text) {
  std::optional<std::string> digits = PythonNumberText(text);
  if (!digits.has_value()) return std::nullopt;
  std::string lower;
  for (char c : *digits) lower.push_back(AsciiLower(c));
  const std::string_view unsigned_part = std::string_view(lower).substr(lower[0] == '+' || lower[0] == '-' ? 1 : 0);
  if (unsigned_part == "inf" || unsigned_part == "infinity" || unsigned_part == "nan") {
    const double magnitude = unsigned_part == "nan" ? std::nan("") : std::numeric_limits<double>::infinity();
    return lower[0] == '-' ? -magnitude : magnitude;
  }
  // Python accepts only decimal digits, a point and an exponent (strtod would also take hex).
  if (unsigned_part.find_first_not_of("0123456789.e+-") != std::string_view::npos) return std::nullopt;
  char* end = nullptr;
  const double value = std::strtod(digits->c_str(), &end);
  if (end != digits->c_str() + digits->size()) return std::nullopt;
  return value;
}

absl::StatusOr<Value> FilterInt(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "int", {"default", "base"}));
  if (bound[1].has_value() && !(bound[1]->is_integral() && bound[1]->as_int() == 10)) {
    return Unsupported(args.line, "int filter base other than 10");
  }
  const Value fallback = bound[0].value_or(Value::Int(0));
  switch (value.kind()) {
    case Value::Kind::kBool:
    case Value::Kind::kInt: return Value::Int(value.as_int());
    case Value::Kind::kFloat: {
      const double number = value.as_double();
      if (std::isnan(number)) return fallback;
      if (std::isinf(number)) return TemplateError(args.line, "cannot convert float infinity to integer");
      if (std::fabs(number) >= 9.2e18) return OverflowError(args.line);
      return Value::Int(static_cast<int64_t>(number));
    }
    case Value::Kind::kString: {
      // Jinja tries int(text), then int(float(text)) so that "42.23" gives 42.
      if (const std::optional<int64_t> parsed = ParsePythonInt(value.as_string())) return Value::Int(*parsed);
      if (const std::optional<double> parsed = ParsePythonFloat(value.as_string())) {
        return FilterInt(Value::Float(*parsed), CallArgs{{fallback}, {}, args.line});
      }
      if (!IsAscii(value.as_string())) return Unsupported(args.line, "int of non-ASCII text");
      return fallback;
    }
    default: return fallback;
  }
}

absl::StatusOr<Value> FilterFloat(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "float", {"default"}));
  const Value fallback = bound[0].value_or(Value::Float(0.0));
  if (value.is_number()) return Value::Float(value.as_double());
  if (value.is(Value::Kind::kString)) {
    if (const std::optional<double> parsed = ParsePythonFloat(value.as_string())) return Value::Float(*parsed);
    if (!IsAscii(value.as_string())) return Unsupported(args.line, "float of non-ASCII text");
  }
  return fallback;
}

absl::StatusOr<Value> FilterToJson(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound,
                          BindArguments(args, "tojson", {"ensure_ascii", "indent", "separators", "sort_keys"}));
  JsonStyle style;
  style.ensure_ascii = bound[0].has_value() && Truthy(*bound[0]);
  if (!IsNoneOrAbsent(bound[1])) {
    if (bound[1]->is_integral()) {
      style.indent = std::string(static_cast<size_t>(std::max<int64_t>(bound[1]->as_int(), 0)), ' ');
    } else if (bound[1]->is(Value::Kind::kString)) {
      style.indent = bound[1]->as_string();
    } else {
      return TemplateError(args.line,
                         absl::StrCat("tojson's indent must be an integer or a string, not ", TypeName(*bound[1])));
    }
    // json.dumps drops the space after commas when it indents.
    style.item_separator = ",";
  }
  if (!IsNoneOrAbsent(bound[2])) {
    const Value& separators = *bound[2];
    if (!IsPlainSequence(separators) || separators.as_list().items.size() != 2 ||
        !separators.as_list().items[0].is(Value::Kind::kString) ||
        !separators.as_list().items[1].is(Value::Kind::kString)) {
      return TemplateError(args.line, "tojson's separators must be two strings");
    }
    style.item_separator = separators.as_list().items[0].as_string();
    style.key_separator = separators.as_list().items[1].as_string();
  }
  style.sort_keys = bound[3].has_value() && Truthy(*bound[3]);
  std::string json;
  LYCHEE_RETURN_IF_ERROR(AppendJson(value, style, 0, args.line, &json));
  return Value::String(std::move(json));
}

absl::StatusOr<Value> FilterJoin(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "join", {"d", "attribute"}));
  std::string separator;
  if (bound[0].has_value()) {
    LYCHEE_ASSIGN_OR_RETURN(separator, Str(*bound[0], args.line));
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(value, args.line));
  std::string joined;
  for (size_t i = 0; i < items.size(); ++i) {
    Value item = items[i];
    if (!IsNoneOrAbsent(bound[1])) {
      LYCHEE_ASSIGN_OR_RETURN(const std::string path, Str(*bound[1], args.line));
      LYCHEE_ASSIGN_OR_RETURN(item, AttributePath(item, path, args.line));
    }
    if (i > 0) joined += separator;
    LYCHEE_RETURN_IF_ERROR(AppendStr(item, args.line, &joined));
  }
  return Value::String(std::move(joined));
}

absl::StatusOr<Value> FilterItems(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "items", {}).status());
  std::vector<Value> pairs;
  if (value.is(Value::Kind::kDict)) {
    for (const auto& [key, item] : value.as_dict().entries) pairs.push_back(ItemTuple(key, item));
  } else if (!value.is(Value::Kind::kUndefined)) {
    return TemplateError(args.line, "Can only get item pairs from a mapping.");
  }
  return Value::List(std::move(pairs), ListKind::kGenerator);
}

absl::StatusOr<Value> FilterDefault(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "default", {"default_value", "boolean"}));
  const bool use_default =
      value.is(Value::Kind::kUndefined) || (bound[1].has_value() && Truthy(*bound[1]) && !Truthy(value));
  if (!use_default) return value;
  return bound[0].value_or(Value::String(""));
}

absl::StatusOr<Value> FilterFirst(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "first", {}).status());
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(value, args.line));
  if (items.empty()) return Value::Undefined("No first item, sequence was empty.");
  return items.front();
}

absl::StatusOr<Value> FilterLast(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "last", {}).status());
  if (value.is(Value::Kind::kList) && value.as_list().kind == ListKind::kGenerator) {
    return TemplateError(args.line, "'generator' object is not reversible");
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(value, args.line));
  if (items.empty()) return Value::Undefined("No last item, sequence was empty.");
  return items.back();
}

absl::StatusOr<Value> FilterReverse(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(RejectMarkup(value, "filter 'reverse'", args.line));
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "reverse", {}).status());
  if (value.is(Value::Kind::kString)) {
    std::u32string code_points = DecodeUtf8(value.as_string());
    std::reverse(code_points.begin(), code_points.end());
    return Value::String(EncodeUtf8(code_points));
  }
  // reversed() of a sequence is an iterator; a generator, not reversible, becomes a list.
  const bool was_generator = value.is(Value::Kind::kList) && value.as_list().kind == ListKind::kGenerator;
  LYCHEE_ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value, args.line));
  std::reverse(items.begin(), items.end());
  return Value::List(std::move(items), was_generator ? ListKind::kList : ListKind::kGenerator);
}

absl::StatusOr<Value> FilterReplace(const Value& value, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "replace", {"old", "new", "count"}));
  if (!bound[0].has_value() || !bound[1].has_value()) {
    return TemplateError(args.line, "replace needs the old and the new text");
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::string text, Str(value, args.line));
  LYCHEE_ASSIGN_OR_RETURN(const std::string old, Str(*bound[0], args.line));
  LYCHEE_ASSIGN_OR_RETURN(const std::string replacement, Str(*bound[1], args.line));
  int64_t count = -1;
  if (!IsNoneOrAbsent(bound[2])) {
    LYCHEE_ASSIGN_OR_RETURN(count, RequireInt(bound[2], "replace's count", args.line));
  }
  return Value::String(ReplaceString(text, old, replacement, count));
}

// select, reject, selectattr and rejectattr: the items (or their attribute) passing a test,
// given by name with its arguments after it, or truthy when no test is named.
absl::StatusOr<Value> SelectOrReject(const Value& value, const CallArgs& args, bool by_attribute, bool select) {
  // Jinja yields nothing from a false value (None included) without looking at the arguments.
  if (!Truthy(value)) return Value::List({}, ListKind::kGenerator);
  std::vector<Value> rest = args.positional;
  std::optional<std::string> attribute;
  if (by_attribute) {
    if (rest.empty() || !rest[0].is(Value::Kind::kString)) {
      return TemplateError(args.line, "selectattr and rejectattr need an attribute name");
    }
    attribute = rest[0].as_string();
    rest.erase(rest.begin());
  }
  std::optional<std::string> test;
  if (!rest.empty()) {
    if (!rest[0].is(Value::Kind::kString)) {
      return TemplateError(args.line, "the test to select with must be named by a string");
    }
    test = rest[0].as_string();
    rest.erase(rest.begin());
    if (!IsSupportedTest(*test)) return Unsupported(args.line, absl::StrCat("test '", *test, "'"));
  }
  const CallArgs test_args{std::move(rest), args.keywords, args.line};
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(value, args.line));
  std::vector<Value> chosen;
  for (const Value& item : items) {
    Value subject = item;
    if (attribute.has_value()) {
      LYCHEE_ASSIGN_OR_RETURN(subject, AttributePath(item, *attribute, args.line));
    }
    bool passes = Truthy(subject);
    if (test.has_value()) {
      LYCHEE_ASSIGN_OR_RETURN(passes, ApplyTest(*test, subject, test_args));
    }
    if (passes == select) chosen.push_back(item);
  }
  return Value::List(std::move(chosen), ListKind::kGenerator);
}

// map(attribute='x', default=d) or map('filter', args...).
absl::StatusOr<Value> FilterMap(const Value& value, const CallArgs& args) {
  // As select: nothing from a false value.
  if (!Truthy(value)) return Value::List({}, ListKind::kGenerator);
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(value, args.line));
  std::vector<Value> mapped;
  if (args.positional.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "map", {"attribute", "default"}));
    if (!bound[0].has_value() || !bound[0]->is(Value::Kind::kString)) {
      return TemplateError(args.line, "map needs a filter name or attribute=");
    }
    for (const Value& item : items) {
      LYCHEE_ASSIGN_OR_RETURN(Value attribute, AttributePath(item, bound[0]->as_string(), args.line));
      if (attribute.is(Value::Kind::kUndefined) && bound[1].has_value()) attribute = *bound[1];
      mapped.push_back(std::move(attribute));
    }
  } else {
    if (!args.positional[0].is(Value::Kind::kString)) {
      return TemplateError(args.line, "map's filter must be named by a string");
    }
    const std::string& filter = args.positional[0].as_string();
    const CallArgs filter_args{std::vector<Value>(args.positional.begin() + 1, args.positional.end()), args.keywords,
                               args.line};
    for (const Value& item : items) {
      LYCHEE_ASSIGN_OR_RETURN(Value result, ApplyFilter(filter, item, filter_args));
      mapped.push_back(std::move(result));
    }
  }
  return Value::List(std::move(mapped), ListKind::kGenerator);
}

// The filters that convert soft_str(value) (str() of anything, "" for undefined).
template <CaseConversion conversion>
absl::StatusOr<Value> FilterCase(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(RejectMarkup(value, "a case filter", args.line));
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "case filter", {}).status());
  LYCHEE_ASSIGN_OR_RETURN(const std::string text, Str(value, args.line));
  LYCHEE_ASSIGN_OR_RETURN(std::string converted, ConvertCase(text, conversion, args.line));
  return Value::String(std::move(converted));
}

absl::StatusOr<Value> FilterTrim(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(RejectMarkup(value, "filter 'trim'", args.line));
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "trim", {"chars"}));
  LYCHEE_ASSIGN_OR_RETURN(const std::string text, Str(value, args.line));
  std::optional<std::u32string> chars;
  if (!IsNoneOrAbsent(bound[0])) {
    LYCHEE_ASSIGN_OR_RETURN(const std::string set, RequireString(bound[0], "trim's characters", args.line));
    chars = DecodeUtf8(set);
  }
  return Value::String(StripPython(text, chars, true, true));
}

absl::StatusOr<Value> FilterLength(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "length", {}).status());
  LYCHEE_ASSIGN_OR_RETURN(const int64_t length, Length(value, args.line));
  return Value::Int(length);
}

// soft_str: str() of anything but a string, which (safe or not) stays as it is.
absl::StatusOr<Value> FilterString(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "string", {}).status());
  if (value.is(Value::Kind::kString)) return value;
  LYCHEE_ASSIGN_OR_RETURN(std::string text, Str(value, args.line));
  return Value::String(std::move(text));
}

absl::StatusOr<Value> FilterList(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "list", {}).status());
  LYCHEE_ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value, args.line));
  return Value::List(std::move(items));
}

absl::StatusOr<Value> FilterSafe(const Value& value, const CallArgs& args) {
  LYCHEE_RETURN_IF_ERROR(BindArguments(args, "safe", {}).status());
  LYCHEE_ASSIGN_OR_RETURN(std::string text, Str(value, args.line));
  return Value::Markup(std::move(text));
}

const std::map<std::string_view, FilterFunction>& Filters() {
  static const auto* const filters = new std::map<std::string_view, FilterFunction>{
      {"trim", FilterTrim},
      {"tojson", FilterToJson},
      {"length", FilterLength},
      {"count", FilterLength},
      {"join", FilterJoin},
      {"items", FilterItems},
      {"upper", FilterCase<CaseConversion::kUpper>},
      {"lower", FilterCase<CaseConversion::kLower>},
      {"capitalize", FilterCase<CaseConversion::kCapitalize>},
      {"title", FilterCase<CaseConversion::kTitleWords>},
      {"default", FilterDefault},
      {"d", FilterDefault},
      {"first", FilterFirst},
      {"last", FilterLast},
      {"string", FilterString},
      {"int", FilterInt},
      {"float", FilterFloat},
      {"list", FilterList},
      {"replace", FilterReplace},
      {"reverse", FilterReverse},
      {"select", [](const Value& v, const CallArgs& a) { return SelectOrReject(v, a, false, true); }},
      {"reject", [](const Value& v, const CallArgs& a) { return SelectOrReject(v, a, false, false); }},
      {"selectattr", [](const Value& v, const CallArgs& a) { return SelectOrReject(v, a, true, true); }},
      {"rejectattr", [](const Value& v, const CallArgs& a) { return SelectOrReject(v, a, true, false); }},
      {"map", FilterMap},
      {"safe", FilterSafe},
  };
  return *filters;
}

bool IsSupportedFilter(std::string_view name) { return Filters().count(name) > 0; }

absl::StatusOr<Value> ApplyFilter(std::string_view name, const Value& value, const CallArgs& args) {
  const auto filter = Filters().find(name);
  if (filter == Filters().end()) return Unsupported(args.line, absl::StrCat("filter '", ToAbsl(name), "'"));
  return filter->second(value, args);
}

// --- Globals.

absl::StatusOr<Value> RaiseException(const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "raise_exception", {"message"}));
  std::string message;
  if (bound[0].has_value()) {
    LYCHEE_ASSIGN_OR_RETURN(message, Str(*bound[0], args.line));
  }
  // The template's own message, as is: it is meant for whoever sent the conversation.
  return absl::InvalidArgumentError(message);
}

absl::StatusOr<Value> StrftimeNow(const std::tm& now, const CallArgs& args) {
  LYCHEE_ASSIGN_OR_RETURN(const auto bound, BindArguments(args, "strftime_now", {"format"}));
  LYCHEE_ASSIGN_OR_RETURN(const std::string format, RequireString(bound[0], "strftime_now's format", args.line));
  if (format.empty()) return Value::String("");
  // strftime returns 0 both for a buffer too small and for an empty result: grow a few times.
  for (size_t size = 64 + 4 * format.size(); size <= 65536; size *= 4) {
    std::string text(size, '\0');
    const size_t length = std::strftime(text.data(), text.size(), format.c_str(), &now);
    if (length > 0) {
      text.resize(length);
      return Value::String(std::move(text));
    }
  }
  return Value::String("");
}

absl::StatusOr<Value> MakeNamespace(const CallArgs& args) {
  auto object = std::make_shared<ObjectData>(ObjectData{ObjectData::Type::kNamespace, {}});
  if (args.positional.size() > 1 || (args.positional.size() == 1 && !args.positional[0].is(Value::Kind::kDict))) {
    return TemplateError(args.line, "namespace() takes a dict and keyword arguments");
  }
  if (!args.positional.empty()) object->attributes = args.positional[0].as_dict();
  for (const auto& [name, value] : args.keywords) object->attributes.Set(name, value);
  return Value::Object(std::move(object));
}

absl::StatusOr<Value> Range(const CallArgs& args) {
  constexpr int64_t kMaxRangeItems = 1 << 20;
  if (!args.keywords.empty() || args.positional.empty() || args.positional.size() > 3) {
    return TemplateError(args.line, "range() takes 1 to 3 positional arguments");
  }
  std::vector<int64_t> bounds;
  for (const Value& argument : args.positional) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t bound, RequireInt(argument, "a range bound", args.line));
    bounds.push_back(bound);
  }
  const int64_t start = bounds.size() == 1 ? 0 : bounds[0];
  const int64_t stop = bounds.size() == 1 ? bounds[0] : bounds[1];
  const int64_t step = bounds.size() == 3 ? bounds[2] : 1;
  if (step == 0) return TemplateError(args.line, "range() arg 3 must not be zero");
  std::vector<Value> items;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
    if (static_cast<int64_t>(items.size()) == kMaxRangeItems) {
      return Unsupported(args.line, "range of more than 2^20 items");
    }
    items.push_back(Value::Int(i));
  }
  // A range object prints as "range(0, 3)", not as a list.
  return Value::List(std::move(items), ListKind::kView);
}

absl::StatusOr<Value> MakeDict(const CallArgs& args) {
  if (!args.positional.empty()) return Unsupported(args.line, "dict() of positional arguments");
  DictData dict;
  for (const auto& [name, value] : args.keywords) dict.Set(name, value);
  return Value::Dict(std::move(dict));
}

// ---------------------------------------------------------------------------------------------
// Parser: jinja2/parser.py's grammar and precedence, from loosest to tightest binding:
// inline if, or, and, not, comparisons (in, not in, ==, <, ...), + -, ~, * / // %, **,
// unary - +, then filters and tests (`x | f`, `x is t`) on a primary with its postfixes
// (.name, [index], [a:b:c], (call)). So `a + b | trim` is a + (b | trim), and
// `not x is defined` is not (x is defined).

// Jinja's tags that this subset does not implement.
constexpr std::string_view kUnsupportedTags[] = {"call",   "filter", "with",       "block", "extends", "include",
                                                 "import", "from",   "autoescape", "raw",   "do",      "trans"};

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  absl::StatusOr<Body> ParseTemplate() && { return ParseBody({}); }

 private:
  // Deep enough for any real template; bounds the recursion on a pathological one.
  static constexpr int kMaxNesting = 128;

  const Token& Peek(size_t ahead = 0) const { return tokens_[std::min(pos_ + ahead, tokens_.size() - 1)]; }
  const Token& Next() {
    const Token& token = Peek();
    if (pos_ < tokens_.size() - 1) ++pos_;
    return token;
  }
  bool IsOperator(std::string_view op, size_t ahead = 0) const {
    return Peek(ahead).type == Token::Type::kOperator && Peek(ahead).text == op;
  }
  bool IsName(std::string_view name, size_t ahead = 0) const {
    return Peek(ahead).type == Token::Type::kName && Peek(ahead).text == name;
  }

  static std::string Describe(const Token& token) {
    switch (token.type) {
      case Token::Type::kData: return "template text";
      case Token::Type::kVariableBegin: return "'{{'";
      case Token::Type::kVariableEnd: return "end of print statement '}}'";
      case Token::Type::kBlockBegin: return "'{%'";
      case Token::Type::kBlockEnd: return "end of statement block '%}'";
      case Token::Type::kString: return "string";
      case Token::Type::kInteger:
      case Token::Type::kFloat: return absl::StrCat("number ", token.text);
      case Token::Type::kEnd: return "end of template";
      default: return absl::StrCat("'", token.text, "'");
    }
  }

  absl::Status Unexpected(absl::string_view expected) const {
    return TemplateError(Peek().line, absl::StrCat("expected ", expected, ", got ", Describe(Peek())));
  }

  absl::Status ExpectOperator(std::string_view op) {
    if (!IsOperator(op)) return Unexpected(absl::StrCat("'", ToAbsl(op), "'"));
    Next();
    return absl::OkStatus();
  }

  absl::Status ExpectBlockEnd() {
    if (Peek().type != Token::Type::kBlockEnd) return Unexpected("end of statement block '%}'");
    Next();
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ExpectName() {
    if (Peek().type != Token::Type::kName) return Unexpected("a name");
    return Next().text;
  }

  // Statements up to a block tag named in `end_tags`; the stream is left at that tag's name.
  absl::StatusOr<Body> ParseBody(std::initializer_list<std::string_view> end_tags) {
    Body body;
    while (true) {
      const Token& token = Peek();
      switch (token.type) {
        case Token::Type::kEnd:
          if (end_tags.size() > 0) {
            return TemplateError(token.line, absl::StrCat("unexpected end of template, expected '",
                                                        std::string(*end_tags.begin()), "'"));
          }
          return body;
        case Token::Type::kData: {
          auto data = std::make_unique<Stmt>(Stmt::Kind::kData, token.line);
          data->text = Next().text;
          body.push_back(std::move(data));
          break;
        }
        case Token::Type::kVariableBegin: {
          Next();
          auto print = std::make_unique<Stmt>(Stmt::Kind::kPrint, token.line);
          LYCHEE_ASSIGN_OR_RETURN(print->expr, ParseTuple(true, {}, false));
          if (Peek().type != Token::Type::kVariableEnd) return Unexpected("end of print statement '}}'");
          Next();
          body.push_back(std::move(print));
          break;
        }
        case Token::Type::kBlockBegin: {
          const Token& tag = Peek(1);
          if (tag.type == Token::Type::kName &&
              std::find(end_tags.begin(), end_tags.end(), tag.text) != end_tags.end()) {
            Next();
            return body;
          }
          Next();
          if (++nesting_ > kMaxNesting) return TemplateError(tag.line, "statements nested too deeply");
          absl::StatusOr<std::unique_ptr<Stmt>> statement = ParseStatement();
          --nesting_;
          if (!statement.ok()) return statement.status();
          body.push_back(std::move(*statement));
          break;
        }
        default: return Unexpected("template text, '{{' or '{%'");
      }
    }
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseStatement() {
    const Token& tag = Peek();
    if (tag.type != Token::Type::kName) return Unexpected("a tag name");
    const int line = tag.line;
    const std::string name = Next().text;
    if (name == "for") return ParseFor(line);
    if (name == "if") return ParseIf(line);
    if (name == "set") return ParseSet(line);
    if (name == "macro") return ParseMacro(line);
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) return TemplateError(line, absl::StrCat("'", name, "' outside a for loop"));
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      return std::make_unique<Stmt>(name == "break" ? Stmt::Kind::kBreak : Stmt::Kind::kContinue, line);
    }
    if (name == "generation") {
      auto scope = std::make_unique<Stmt>(Stmt::Kind::kScope, line);
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      LYCHEE_ASSIGN_OR_RETURN(scope->body, ParseScopedBody({"endgeneration"}));
      Next();
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      return scope;
    }
    if (IsOneOf(name, kUnsupportedTags)) return Unsupported(line, absl::StrCat("tag '", name, "'"));
    return TemplateError(line, absl::StrCat("unknown tag '", name, "'"));
  }

  // The body of a for loop, set block, generation block or macro, which has a scope of its own.
  absl::StatusOr<Body> ParseScopedBody(std::initializer_list<std::string_view> end_tags) {
    ++scope_depth_;
    absl::StatusOr<Body> body = ParseBody(end_tags);
    --scope_depth_;
    return body;
  }

  // {% macro name(parameter, parameter=default, ...) %}...{% endmacro %}. A macro reads the
  // variables of the scope it is defined in when it is called; defined only at the top level,
  // that is the render's own scope, which outlives every call.
  absl::StatusOr<std::unique_ptr<Stmt>> ParseMacro(int line) {
    if (scope_depth_ > 0) return Unsupported(line, "macro defined inside a for loop, set block or macro");
    auto macro = std::make_unique<Stmt>(Stmt::Kind::kMacro, line);
    LYCHEE_ASSIGN_OR_RETURN(macro->text, ExpectName());
    LYCHEE_RETURN_IF_ERROR(ExpectOperator("("));
    while (!IsOperator(")")) {
      if (!macro->targets.empty()) {
        LYCHEE_RETURN_IF_ERROR(ExpectOperator(","));
        if (IsOperator(")")) break;
      }
      LYCHEE_ASSIGN_OR_RETURN(std::string parameter, ExpectName());
      ExprPtr default_value;
      if (IsOperator("=")) {
        Next();
        LYCHEE_ASSIGN_OR_RETURN(default_value, ParseExpression());
      } else if (!macro->defaults.empty() && macro->defaults.back() != nullptr) {
        return TemplateError(line, "non-default argument follows default argument");
      }
      macro->targets.push_back(std::move(parameter));
      macro->defaults.push_back(std::move(default_value));
    }
    Next();
    LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
    LYCHEE_ASSIGN_OR_RETURN(macro->body, ParseScopedBody({"endmacro"}));
    Next();
    LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
    return macro;
  }

  // Assignment targets: a name, or names separated by commas (optionally in parentheses).
  absl::StatusOr<std::vector<std::string>> ParseTargets() {
    const bool parenthesized = IsOperator("(");
    if (parenthesized) Next();
    std::vector<std::string> targets;
    do {
      if (!targets.empty()) Next();
      LYCHEE_ASSIGN_OR_RETURN(std::string target, ExpectName());
      targets.push_back(std::move(target));
    } while (IsOperator(","));
    if (parenthesized) LYCHEE_RETURN_IF_ERROR(ExpectOperator(")"));
    return targets;
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseFor(int line) {
    auto loop = std::make_unique<Stmt>(Stmt::Kind::kFor, line);
    LYCHEE_ASSIGN_OR_RETURN(loop->targets, ParseTargets());
    if (!IsName("in")) return Unexpected("'in'");
    Next();
    LYCHEE_ASSIGN_OR_RETURN(loop->expr, ParseTuple(false, {"recursive"}, false));
    if (IsName("if")) {
      Next();
      LYCHEE_ASSIGN_OR_RETURN(loop->condition, ParseExpression());
    }
    if (IsName("recursive")) return Unsupported(Peek().line, "recursive for loop");
    LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
    ++loop_depth_;
    absl::StatusOr<Body> body = ParseScopedBody({"endfor", "else"});
    --loop_depth_;
    if (!body.ok()) return body.status();
    loop->body = std::move(*body);
    if (Next().text == "else") {
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      LYCHEE_ASSIGN_OR_RETURN(loop->else_body, ParseScopedBody({"endfor"}));
      Next();
    }
    LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
    return loop;
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseIf(int line) {
    auto branch = std::make_unique<Stmt>(Stmt::Kind::kIf, line);
    while (true) {
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr condition, ParseTuple(false, {}, false));
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      LYCHEE_ASSIGN_OR_RETURN(Body body, ParseBody({"elif", "else", "endif"}));
      branch->branches.emplace_back(std::move(condition), std::move(body));
      const std::string tag = Next().text;
      if (tag == "elif") continue;
      if (tag == "else") {
        LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
        LYCHEE_ASSIGN_OR_RETURN(branch->else_body, ParseBody({"endif"}));
        Next();
      }
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      return branch;
    }
  }

  absl::StatusOr<std::unique_ptr<Stmt>> ParseSet(int line) {
    auto set = std::make_unique<Stmt>(Stmt::Kind::kSet, line);
    if (Peek().type == Token::Type::kName && IsOperator(".", 1)) {
      set->targets.push_back(Next().text);
      Next();
      LYCHEE_ASSIGN_OR_RETURN(set->attribute, ExpectName());
    } else {
      LYCHEE_ASSIGN_OR_RETURN(set->targets, ParseTargets());
    }
    if (IsOperator("=")) {
      Next();
      LYCHEE_ASSIGN_OR_RETURN(set->expr, ParseTuple(true, {}, false));
      LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
      return set;
    }
    // {% set name [| filters] %}...{% endset %}: the rendered block.
    if (set->targets.size() != 1 || !set->attribute.empty()) {
      return Unsupported(line, "block set of anything but a name");
    }
    set->kind = Stmt::Kind::kSetBlock;
    if (IsOperator("|")) {
      LYCHEE_ASSIGN_OR_RETURN(set->filter, ParseFilters(nullptr));
    }
    LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
    LYCHEE_ASSIGN_OR_RETURN(set->body, ParseScopedBody({"endset"}));
    Next();
    LYCHEE_RETURN_IF_ERROR(ExpectBlockEnd());
    return set;
  }

  static ExprPtr MakeExpr(Expr::Kind kind, int line, std::vector<ExprPtr> operands = {}, std::string name = "") {
    auto expr = std::make_unique<Expr>(kind, line, std::move(name));
    expr->operands = std::move(operands);
    return expr;
  }

  template <typename... Operands>
  static std::vector<ExprPtr> OperandList(Operands&&... operands) {
    std::vector<ExprPtr> list;
    (list.push_back(std::forward<Operands>(operands)), ...);
    return list;
  }

  // Expressions separated by commas make a tuple; `with_conditional` allows inline ifs.
  absl::StatusOr<ExprPtr> ParseTuple(bool with_conditional, std::initializer_list<std::string_view> end_names,
                                     bool parenthesized) {
    const int line = Peek().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) LYCHEE_RETURN_IF_ERROR(ExpectOperator(","));
      const Token& token = Peek();
      const bool at_end = token.type == Token::Type::kVariableEnd || token.type == Token::Type::kBlockEnd ||
                          IsOperator(")") ||
                          (token.type == Token::Type::kName &&
                           std::find(end_names.begin(), end_names.end(), token.text) != end_names.end());
      if (at_end) break;
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr item, with_conditional ? ParseExpression() : ParseOr());
      items.push_back(std::move(item));
      if (!IsOperator(",")) break;
      is_tuple = true;
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!parenthesized) return Unexpected("an expression");
    }
    return MakeExpr(Expr::Kind::kTuple, line, std::move(items));
  }

  absl::StatusOr<ExprPtr> ParseExpression() {
    if (++nesting_ > kMaxNesting) return TemplateError(Peek().line, "expression nested too deeply");
    absl::StatusOr<ExprPtr> expr = ParseConditional();
    --nesting_;
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseConditional() {
    const int line = Peek().line;
    LYCHEE_ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    while (IsName("if")) {
      Next();
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr condition, ParseOr());
      ExprPtr otherwise;
      if (IsName("else")) {
        Next();
        LYCHEE_ASSIGN_OR_RETURN(otherwise, ParseConditional());
      }
      expr = MakeExpr(Expr::Kind::kConditional, line,
                      OperandList(std::move(expr), std::move(condition), std::move(otherwise)));
    }
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    LYCHEE_ASSIGN_OR_RETURN(ExprPtr left, ParseAnd());
    while (IsName("or")) {
      const int line = Next().line;
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr right, ParseAnd());
      left = MakeExpr(Expr::Kind::kOr, line, OperandList(std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseAnd() {
    LYCHEE_ASSIGN_OR_RETURN(ExprPtr left, ParseNot());
    while (IsName("and")) {
      const int line = Next().line;
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr right, ParseNot());
      left = MakeExpr(Expr::Kind::kAnd, line, OperandList(std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      const int line = Next().line;
      if (++nesting_ > kMaxNesting) return TemplateError(line, "expression nested too deeply");
      absl::StatusOr<ExprPtr> operand = ParseNot();
      --nesting_;
      if (!operand.ok()) return operand.status();
      return MakeExpr(Expr::Kind::kNot, line, OperandList(std::move(*operand)));
    }
    return ParseComparison();
  }

  absl::StatusOr<ExprPtr> ParseComparison() {
    const int line = Peek().line;
    LYCHEE_ASSIGN_OR_RETURN(ExprPtr first, ParseAdditive());
    auto comparison = MakeExpr(Expr::Kind::kCompare, line, OperandList(std::move(first)));
    while (true) {
      std::string op;
      if (Peek().type == Token::Type::kOperator && (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
                                                    Peek().text == "<=" || Peek().text == ">" || Peek().text == ">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        Next();
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        Next();
        Next();
        op = "not in";
      } else {
        break;
      }
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr operand, ParseAdditive());
      comparison->comparisons.push_back(std::move(op));
      comparison->operands.push_back(std::move(operand));
    }
    if (comparison->comparisons.empty()) return std::move(comparison->operands[0]);
    return comparison;
  }

  // A left-associative chain of binary operators over operands that `parse_operand` reads.
  absl::StatusOr<ExprPtr> ParseBinaryChain(std::initializer_list<std::string_view> ops,
                                           absl::StatusOr<ExprPtr> (Parser::*parse_operand)()) {
    LYCHEE_ASSIGN_OR_RETURN(ExprPtr left, (this->*parse_operand)());
    while (Peek().type == Token::Type::kOperator && std::find(ops.begin(), ops.end(), Peek().text) != ops.end()) {
      const Token& op = Next();
      const int line = op.line;
      std::string name = op.text;
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr right, (this->*parse_operand)());
      left = MakeExpr(Expr::Kind::kBinary, line, OperandList(std::move(left), std::move(right)), std::move(name));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseAdditive() { return ParseBinaryChain({"+", "-"}, &Parser::ParseConcatenation); }
  absl::StatusOr<ExprPtr> ParseConcatenation() { return ParseBinaryChain({"~"}, &Parser::ParseMultiplicative); }
  absl::StatusOr<ExprPtr> ParseMultiplicative() { return ParseBinaryChain({"*", "/", "//", "%"}, &Parser::ParsePower); }
  // Jinja's ** is left-associative, unlike Python's.
  absl::StatusOr<ExprPtr> ParsePower() { return ParseBinaryChain({"**"}, &Parser::ParseUnaryWithFilters); }
  absl::StatusOr<ExprPtr> ParseUnaryWithFilters() { return ParseUnary(true); }

  absl::StatusOr<ExprPtr> ParseUnary(bool with_filters) {
    const int line = Peek().line;
    ExprPtr expr;
    if (IsOperator("-") || IsOperator("+")) {
      const Expr::Kind kind = Next().text == "-" ? Expr::Kind::kNegate : Expr::Kind::kPositive;
      if (++nesting_ > kMaxNesting) return TemplateError(line, "expression nested too deeply");
      absl::StatusOr<ExprPtr> operand = ParseUnary(false);
      --nesting_;
      if (!operand.ok()) return operand.status();
      expr = MakeExpr(kind, line, OperandList(std::move(*operand)));
    } else {
      LYCHEE_ASSIGN_OR_RETURN(expr, ParsePrimary());
    }
    LYCHEE_ASSIGN_OR_RETURN(expr, ParsePostfix(std::move(expr)));
    if (!with_filters) return expr;
    // Filters, tests and calls of their results, in any order.
    while (true) {
      if (IsOperator("|")) {
        LYCHEE_ASSIGN_OR_RETURN(expr, ParseFilters(std::move(expr)));
      } else if (IsName("is")) {
        LYCHEE_ASSIGN_OR_RETURN(expr, ParseTest(std::move(expr)));
      } else if (IsOperator("(")) {
        LYCHEE_ASSIGN_OR_RETURN(expr, ParseCall(std::move(expr)));
      } else {
        return expr;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Token& token = Peek();
    const int line = token.line;
    switch (token.type) {
      case Token::Type::kName: {
        const std::string name = Next().text;
        auto constant = MakeExpr(Expr::Kind::kConstant, line);
        if (name == "true" || name == "True") {
          constant->constant = Value::Bool(true);
        } else if (name == "false" || name == "False") {
          constant->constant = Value::Bool(false);
        } else if (name == "none" || name == "None") {
          constant->constant = Value::None();
        } else {
          return MakeExpr(Expr::Kind::kName, line, {}, name);
        }
        return constant;
      }
      case Token::Type::kString: {
        // Adjacent string literals concatenate.
        std::string text;
        while (Peek().type == Token::Type::kString) text += Next().text;
        auto constant = MakeExpr(Expr::Kind::kConstant, line);
        constant->constant = Value::String(std::move(text));
        return constant;
      }
      case Token::Type::kInteger:
      case Token::Type::kFloat: {
        const std::string digits = Next().text;
        auto constant = MakeExpr(Expr::Kind::kConstant, line);
        if (token.type == Token::Type::kInteger) {
          int64_t value = 0;
          const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
          if (error != std::errc() || end != digits.data() + digits.size()) {
            return Unsupported(line, "integer literal beyond 64 bits");
          }
          constant->constant = Value::Int(value);
        } else {
          constant->constant = Value::Float(std::strtod(digits.c_str(), nullptr));
        }
        return constant;
      }
      case Token::Type::kOperator:
        if (token.text == "(") {
          Next();
          if (++nesting_ > kMaxNesting) return TemplateError(line, "expression nested too deeply");
          absl::StatusOr<ExprPtr> inner = ParseTuple(true, {}, true);
          --nesting_;
          if (!inner.ok()) return inner.status();
          LYCHEE_RETURN_IF_ERROR(ExpectOperator(")"));
          return std::move(*inner);
        }
        if (token.text == "[") return ParseList();
        if (token.text == "{") return ParseDict();
        break;
      default: break;
    }
    return Unexpected("an expression");
  }

  absl::StatusOr<ExprPtr> ParseList() {
    auto list = MakeExpr(Expr::Kind::kList, Next().line);
    while (!IsOperator("]")) {
      if (!list->operands.empty()) {
        LYCHEE_RETURN_IF_ERROR(ExpectOperator(","));
        if (IsOperator("]")) break;
      }
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
      list->operands.push_back(std::move(item));
    }
    Next();
    return list;
  }

  absl::StatusOr<ExprPtr> ParseDict() {
    auto dict = MakeExpr(Expr::Kind::kDict, Next().line);
    while (!IsOperator("}")) {
      if (!dict->operands.empty()) {
        LYCHEE_RETURN_IF_ERROR(ExpectOperator(","));
        if (IsOperator("}")) break;
      }
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr key, ParseExpression());
      LYCHEE_RETURN_IF_ERROR(ExpectOperator(":"));
      LYCHEE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
      dict->operands.push_back(std::move(key));
      dict->operands.push_back(std::move(value));
    }
    Next();
    return dict;
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr expr) {
    while (true) {
      const int line = Peek().line;
      if (IsOperator(".")) {
        Next();
        const Token& attribute = Next();
        if (attribute.type == Token::Type::kName) {
          expr = MakeExpr(Expr::Kind::kAttribute, line, OperandList(std::move(expr)), attribute.text);
        } else if (attribute.type == Token::Type::kInteger) {
          // x.0 is x[0].
          auto index = MakeExpr(Expr::Kind::kConstant, line);
          index->constant = Value::Int(std::strtoll(attribute.text.c_str(), nullptr, 10));
          expr = MakeExpr(Expr::Kind::kItem, line, OperandList(std::move(expr), std::move(index)));
        } else {
          return TemplateError(line, "expected a name or a number after '.'");
        }
      } else if (IsOperator("[")) {
        Next();
        LYCHEE_ASSIGN_OR_RETURN(expr, ParseSubscript(std::move(expr), line));
      } else if (IsOperator("(")) {
        LYCHEE_ASSIGN_OR_RETURN(expr, ParseCall(std::move(expr)));
      } else {
        return expr;
      }
    }
  }

  // After "[": an index or a slice, then "]".
  absl::StatusOr<ExprPtr> ParseSubscript(ExprPtr object, int line) {
    ExprPtr bounds[3];
    bool is_slice = false;
    for (int part = 0; part < 3; ++part) {
      if (part > 0) {
        if (!IsOperator(":")) break;
        Next();
        is_slice = true;
      }
      if (!IsOperator(":") && !IsOperator("]")) {
        LYCHEE_ASSIGN_OR_RETURN(bounds[part], ParseExpression());
      }
    }
    if (IsOperator(",")) return Unsupported(line, "subscript with several indices");
    LYCHEE_RETURN_IF_ERROR(ExpectOperator("]"));
    if (!is_slice) {
      if (bounds[0] == nullptr) return TemplateError(line, "expected an index");
      return MakeExpr(Expr::Kind::kItem, line, OperandList(std::move(object), std::move(bounds[0])));
    }
    return MakeExpr(Expr::Kind::kSlice, line,
                    OperandList(std::move(object), std::move(bounds[0]), std::move(bounds[1]), std::move(bounds[2])));
  }

  // After the callee or filter name: "(" arguments ")" into expr's operands and keywords.
  absl::Status ParseArguments(Expr* expr) {
    LYCHEE_RETURN_IF_ERROR(ExpectOperator("("));
    bool first = true;
    while (!IsOperator(")")) {
      if (!first) {
        LYCHEE_RETURN_IF_ERROR(ExpectOperator(","));
        if (IsOperator(")")) break;
      }
      first = false;
      if (IsOperator("*") || IsOperator("**")) return Unsupported(Peek().line, "*args or **kwargs in a call");
      if (Peek().type == Token::Type::kName && IsOperator("=", 1)) {
        std::string name = Next().text;
        Next();
        LYCHEE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        expr->keywords.emplace_back(std::move(name), std::move(value));
      } else {
        if (!expr->keywords.empty()) return TemplateError(Peek().line, "positional argument after a keyword argument");
        LYCHEE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        expr->operands.push_back(std::move(value));
      }
    }
    Next();
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> ParseCall(ExprPtr callee) {
    auto call = MakeExpr(Expr::Kind::kCall, Peek().line, OperandList(std::move(callee)));
    LYCHEE_RETURN_IF_ERROR(ParseArguments(call.get()));
    return call;
  }

  // A dotted name, for filters and tests.
  absl::StatusOr<std::string> ParseDottedName() {
    LYCHEE_ASSIGN_OR_RETURN(std::string name, ExpectName());
    while (IsOperator(".")) {
      Next();
      LYCHEE_ASSIGN_OR_RETURN(const std::string part, ExpectName());
      absl::StrAppend(&name, ".", part);
    }
    return name;
  }

  // "| name(args)" repeated; `operand` is null for a {% set %} block's filters.
  absl::StatusOr<ExprPtr> ParseFilters(ExprPtr operand) {
    ExprPtr expr = std::move(operand);
    while (IsOperator("|")) {
      const int line = Next().line;
      LYCHEE_ASSIGN_OR_RETURN(std::string name, ParseDottedName());
      if (!IsSupportedFilter(name)) return Unsupported(line, absl::StrCat("filter '", name, "'"));
      expr = MakeExpr(Expr::Kind::kFilter, line, OperandList(std::move(expr)), std::move(name));
      if (IsOperator("(")) LYCHEE_RETURN_IF_ERROR(ParseArguments(expr.get()));
    }
    return expr;
  }

  // "is [not] name", then "(args)" or a single argument without parentheses (`is equalto 'x'`).
  absl::StatusOr<ExprPtr> ParseTest(ExprPtr operand) {
    const int line = Next().line;
    const bool negated = IsName("not");
    if (negated) Next();
    LYCHEE_ASSIGN_OR_RETURN(std::string name, ParseDottedName());
    if (!IsSupportedTest(name)) return Unsupported(line, absl::StrCat("test '", name, "'"));
    auto test = MakeExpr(Expr::Kind::kTest, line, OperandList(std::move(operand)), std::move(name));
    if (IsOperator("(")) {
      LYCHEE_RETURN_IF_ERROR(ParseArguments(test.get()));
    } else {
      const Token& next = Peek();
      const bool starts_argument = next.type == Token::Type::kName || next.type == Token::Type::kString ||
                                   next.type == Token::Type::kInteger || next.type == Token::Type::kFloat ||
                                   IsOperator("(") || IsOperator("[") || IsOperator("{");
      if (starts_argument && !IsName("else") && !IsName("or") && !IsName("and")) {
        if (IsName("is")) return TemplateError(next.line, "tests cannot be chained with 'is'");
        LYCHEE_ASSIGN_OR_RETURN(ExprPtr argument, ParsePrimary());
        LYCHEE_ASSIGN_OR_RETURN(argument, ParsePostfix(std::move(argument)));
        test->operands.push_back(std::move(argument));
      }
    }
    if (negated) return MakeExpr(Expr::Kind::kNot, line, OperandList(std::move(test)));
    return test;
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int loop_depth_ = 0;
  // How many enclosing bodies have a scope of their own.
  int scope_depth_ = 0;
  int nesting_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Renderer: executes the statements into the output text.

// Variables. A for loop's every iteration gets a scope of its own, so that what its body sets
// does not outlive the iteration (Jinja's scoping, hence namespace()); if blocks share theirs.
class Scope {
 public:
  explicit Scope(const Scope* parent) : parent_(parent) {}

  const Value* Find(const std::string& name) const {
    for (const Scope* scope = this; scope != nullptr; scope = scope->parent_) {
      const auto found = scope->variables_.find(name);
      if (found != scope->variables_.end()) return &found->second;
    }
    return nullptr;
  }
  void Set(const std::string& name, Value value) { variables_[name] = std::move(value); }

 private:
  const Scope* parent_;
  std::unordered_map<std::string, Value> variables_;
};

// What a statement list ended with: {% break %} and {% continue %} end it early.
enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  explicit Renderer(std::string* out) : out_(out) {}

  absl::StatusOr<Flow> Execute(const Body& body, Scope& scope) {
    for (const auto& statement : body) {
      LYCHEE_ASSIGN_OR_RETURN(const Flow flow, ExecuteStatement(*statement, scope));
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

 private:
  absl::StatusOr<Flow> ExecuteStatement(const Stmt& statement, Scope& scope) {
    switch (statement.kind) {
      case Stmt::Kind::kData: out_->append(statement.text); return Flow::kNormal;
      case Stmt::Kind::kPrint: {
        LYCHEE_ASSIGN_OR_RETURN(const Value value, Eval(*statement.expr, scope));
        LYCHEE_RETURN_IF_ERROR(AppendStr(value, statement.line, out_));
        return Flow::kNormal;
      }
      case Stmt::Kind::kIf:
        for (const auto& [condition, body] : statement.branches) {
          LYCHEE_ASSIGN_OR_RETURN(const Value value, Eval(*condition, scope));
          if (Truthy(value)) return Execute(body, scope);
        }
        return Execute(statement.else_body, scope);
      case Stmt::Kind::kFor: return ExecuteFor(statement, scope);
      case Stmt::Kind::kSet: {
        LYCHEE_ASSIGN_OR_RETURN(Value value, Eval(*statement.expr, scope));
        LYCHEE_RETURN_IF_ERROR(Assign(statement, std::move(value), scope));
        return Flow::kNormal;
      }
      case Stmt::Kind::kSetBlock: {
        std::string text;
        std::string* const outer = out_;
        out_ = &text;
        Scope block_scope(&scope);
        absl::StatusOr<Flow> flow = Execute(statement.body, block_scope);
        out_ = outer;
        if (!flow.ok()) return flow.status();
        Value value = Value::String(std::move(text));
        if (statement.filter != nullptr) {
          LYCHEE_ASSIGN_OR_RETURN(value, EvalFilter(*statement.filter, value, scope));
        }
        scope.Set(statement.targets[0], std::move(value));
        return *flow;
      }
      case Stmt::Kind::kBreak: return Flow::kBreak;
      case Stmt::Kind::kContinue: return Flow::kContinue;
      case Stmt::Kind::kScope: {
        Scope inner(&scope);
        return Execute(statement.body, inner);
      }
      case Stmt::Kind::kMacro:
        // The parser takes macros only at the top level, whose scope outlives every call.
        scope.Set(statement.text, MakeFunction(statement.text, [this, &statement, &scope](const CallArgs& args) {
                    return CallMacro(statement, scope, args);
                  }));
        return Flow::kNormal;
    }
    return Flow::kNormal;
  }

  // A macro call: the arguments bound in a scope inside the defining one, the body rendered to
  // text. Jinja would pass extra arguments as varargs and kwargs; here they are an error.
  absl::StatusOr<Value> CallMacro(const Stmt& macro, const Scope& defining_scope, const CallArgs& args) {
    const std::vector<std::string>& parameters = macro.targets;
    if (args.positional.size() > parameters.size()) {
      return TemplateError(
          args.line, absl::StrCat("macro '", macro.text, "' takes not more than ", parameters.size(), " argument(s)"));
    }
    std::vector<std::optional<Value>> arguments(parameters.size());
    std::copy(args.positional.begin(), args.positional.end(), arguments.begin());
    for (const auto& [name, value] : args.keywords) {
      const auto parameter = std::find(parameters.begin(), parameters.end(), name);
      if (parameter == parameters.end()) {
        return TemplateError(args.line, absl::StrCat("macro '", macro.text, "' takes no keyword argument '", name, "'"));
      }
      std::optional<Value>& argument = arguments[static_cast<size_t>(parameter - parameters.begin())];
      if (argument.has_value()) {
        return TemplateError(args.line,
                           absl::StrCat("macro '", macro.text, "' got multiple values for argument '", name, "'"));
      }
      argument = value;
    }
    if (macro_depth_ == kMaxMacroDepth) return TemplateError(args.line, "macro calls nested too deeply");
    Scope call_scope(&defining_scope);
    // Defaults are evaluated at the call, where the parameters before them are bound.
    for (size_t i = 0; i < parameters.size(); ++i) {
      Value value = Value::Undefined(absl::StrCat("parameter '", parameters[i], "' was not provided"));
      if (arguments[i].has_value()) {
        value = *arguments[i];
      } else if (macro.defaults[i] != nullptr) {
        LYCHEE_ASSIGN_OR_RETURN(value, Eval(*macro.defaults[i], call_scope));
      }
      call_scope.Set(parameters[i], std::move(value));
    }
    call_scope.Set("varargs", Value::List({}, ListKind::kTuple));
    call_scope.Set("kwargs", Value::Dict({}));
    std::string text;
    std::string* const outer = out_;
    out_ = &text;
    ++macro_depth_;
    const absl::StatusOr<Flow> flow = Execute(macro.body, call_scope);
    --macro_depth_;
    out_ = outer;
    if (!flow.ok()) return flow.status();
    return Value::String(std::move(text));
  }

  // Binds the targets of a for loop or a set: one name takes the value, several unpack it.
  static absl::Status Bind(const std::vector<std::string>& targets, const Value& value, int line, Scope& scope) {
    if (targets.size() == 1) {
      scope.Set(targets[0], value);
      return absl::OkStatus();
    }
    LYCHEE_ASSIGN_OR_RETURN(const std::vector<Value> items, Iterate(value, line));
    if (items.size() != targets.size()) {
      return TemplateError(
          line, absl::StrCat(items.size() < targets.size() ? "not enough" : "too many", " values to unpack (expected ",
                             targets.size(), ", got ", items.size(), ")"));
    }
    for (size_t i = 0; i < items.size(); ++i) scope.Set(targets[i], items[i]);
    return absl::OkStatus();
  }

  static absl::Status Assign(const Stmt& set, Value value, Scope& scope) {
    if (set.attribute.empty()) return Bind(set.targets, value, set.line, scope);
    const Value* target = scope.Find(set.targets[0]);
    if (target == nullptr || !target->is(Value::Kind::kObject) ||
        target->as_object().type != ObjectData::Type::kNamespace) {
      return TemplateError(set.line, "cannot assign attribute on non-namespace object");
    }
    target->as_object().attributes.Set(set.attribute, std::move(value));
    return absl::OkStatus();
  }

  // Jinja's loop variable: index, index0, revindex, revindex0, first, last, length, previtem,
  // nextitem, depth, depth0 and cycle(...).
  static Value LoopObject(const std::vector<Value>& items, size_t i) {
    const auto length = static_cast<int64_t>(items.size());
    const auto index = static_cast<int64_t>(i);
    DictData attributes;
    attributes.Set("index", Value::Int(index + 1));
    attributes.Set("index0", Value::Int(index));
    attributes.Set("revindex", Value::Int(length - index));
    attributes.Set("revindex0", Value::Int(length - index - 1));
    attributes.Set("first", Value::Bool(index == 0));
    attributes.Set("last", Value::Bool(index == length - 1));
    attributes.Set("length", Value::Int(length));
    attributes.Set("depth", Value::Int(1));
    attributes.Set("depth0", Value::Int(0));
    if (index > 0) attributes.Set("previtem", items[i - 1]);
    if (index + 1 < length) attributes.Set("nextitem", items[i + 1]);
    attributes.Set("cycle", MakeFunction("loop.cycle", [index](const CallArgs& args) -> absl::StatusOr<Value> {
                     if (args.positional.empty() || !args.keywords.empty()) {
                       return TemplateError(args.line, "loop.cycle() needs positional arguments");
                     }
                     return args.positional[static_cast<size_t>(index) % args.positional.size()];
                   }));
    return Value::Object(std::make_shared<ObjectData>(ObjectData{ObjectData::Type::kLoop, std::move(attributes)}));
  }

  absl::StatusOr<Flow> ExecuteFor(const Stmt& loop, Scope& scope) {
    LYCHEE_ASSIGN_OR_RETURN(const Value iterable, Eval(*loop.expr, scope));
    LYCHEE_ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(iterable, loop.line));
    if (loop.condition != nullptr) {
      // The loop's filter picks the items before the loop sees them: loop.index, loop.last and
      // loop.length count only those.
      std::vector<Value> picked;
      for (Value& item : items) {
        Scope filter_scope(&scope);
        LYCHEE_RETURN_IF_ERROR(Bind(loop.targets, item, loop.line, filter_scope));
        LYCHEE_ASSIGN_OR_RETURN(const Value keep, Eval(*loop.condition, filter_scope));
        if (Truthy(keep)) picked.push_back(std::move(item));
      }
      items = std::move(picked);
    }
    if (items.empty()) {
      Scope else_scope(&scope);
      return Execute(loop.else_body, else_scope);
    }
    for (size_t i = 0; i < items.size(); ++i) {
      Scope iteration(&scope);
      LYCHEE_RETURN_IF_ERROR(Bind(loop.targets, items[i], loop.line, iteration));
      iteration.Set("loop", LoopObject(items, i));
      LYCHEE_ASSIGN_OR_RETURN(const Flow flow, Execute(loop.body, iteration));
      if (flow == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  absl::StatusOr<CallArgs> EvalArguments(const Expr& expr, size_t first_operand, Scope& scope) {
    CallArgs args;
    args.line = expr.line;
    for (size_t i = first_operand; i < expr.operands.size(); ++i) {
      LYCHEE_ASSIGN_OR_RETURN(Value value, Eval(*expr.operands[i], scope));
      args.positional.push_back(std::move(value));
    }
    for (const auto& [name, value_expr] : expr.keywords) {
      LYCHEE_ASSIGN_OR_RETURN(Value value, Eval(*value_expr, scope));
      args.keywords.emplace_back(name, std::move(value));
    }
    return args;
  }

  // A filter expression applied to `input` in place of its innermost operand when that is null
  // (the filters of a {% set %} block).
  absl::StatusOr<Value> EvalFilter(const Expr& filter, const Value& input, Scope& scope) {
    Value value = input;
    if (filter.operands[0] != nullptr) {
      const Expr& operand = *filter.operands[0];
      LYCHEE_ASSIGN_OR_RETURN(
          value, operand.kind == Expr::Kind::kFilter ? EvalFilter(operand, input, scope) : Eval(operand, scope));
    }
    LYCHEE_ASSIGN_OR_RETURN(const CallArgs args, EvalArguments(filter, 1, scope));
    return ApplyFilter(filter.name, value, args);
  }

  static absl::StatusOr<std::optional<int64_t>> SliceBound(const std::optional<Value>& bound) {
    if (!bound.has_value() || bound->is(Value::Kind::kNone)) return std::optional<int64_t>();
    if (!bound->is_integral()) return absl::InvalidArgumentError("slice indices must be integers or None");
    return std::optional<int64_t>(bound->as_int());
  }

  absl::StatusOr<Value> EvalSlice(const Expr& expr, Scope& scope) {
    LYCHEE_ASSIGN_OR_RETURN(const Value object, Eval(*expr.operands[0], scope));
    if (object.is(Value::Kind::kUndefined)) return UndefinedError(expr.line, object);
    LYCHEE_RETURN_IF_ERROR(RejectMarkup(object, "a slice", expr.line));
    std::optional<Value> bounds[3];
    for (int i = 0; i < 3; ++i) {
      if (expr.operands[static_cast<size_t>(i) + 1] != nullptr) {
        LYCHEE_ASSIGN_OR_RETURN(bounds[i], Eval(*expr.operands[static_cast<size_t>(i) + 1], scope));
      }
    }
    const absl::StatusOr<std::optional<int64_t>> start = SliceBound(bounds[0]);
    const absl::StatusOr<std::optional<int64_t>> stop = SliceBound(bounds[1]);
    const absl::StatusOr<std::optional<int64_t>> step = SliceBound(bounds[2]);
    // Python's TypeError (a bound that is no integer, an object that cannot be sliced) makes
    // Jinja's getitem give an undefined value.
    const Value undefined = Value::Undefined(absl::StrCat(TypeName(object), " object cannot be sliced so"));
    if (!start.ok() || !stop.ok() || !step.ok()) return undefined;
    if (object.is(Value::Kind::kString)) {
      const std::u32string code_points = DecodeUtf8(object.as_string());
      LYCHEE_ASSIGN_OR_RETURN(const std::vector<int64_t> indices,
                              SliceIndices(static_cast<int64_t>(code_points.size()), *start, *stop, *step, expr.line));
      std::u32string sliced;
      for (int64_t i : indices) sliced.push_back(code_points[static_cast<size_t>(i)]);
      return Value::String(EncodeUtf8(sliced));
    }
    if (!IsPlainSequence(object)) return undefined;
    const std::vector<Value>& items = object.as_list().items;
    LYCHEE_ASSIGN_OR_RETURN(const std::vector<int64_t> indices,
                            SliceIndices(static_cast<int64_t>(items.size()), *start, *stop, *step, expr.line));
    std::vector<Value> sliced;
    for (int64_t i : indices) sliced.push_back(items[static_cast<size_t>(i)]);
    return Value::List(std::move(sliced), object.as_list().kind);
  }

  absl::StatusOr<Value> Eval(const Expr& expr, Scope& scope) {
    const int line = expr.line;
    switch (expr.kind) {
      case Expr::Kind::kConstant: return expr.constant;
      case Expr::Kind::kName: {
        if (const Value* value = scope.Find(expr.name)) return *value;
        return Value::Undefined(absl::StrCat("'", expr.name, "' is undefined"));
      }
      case Expr::Kind::kList:
      case Expr::Kind::kTuple: {
        std::vector<Value> items;
        for (const auto& operand : expr.operands) {
          LYCHEE_ASSIGN_OR_RETURN(Value item, Eval(*operand, scope));
          items.push_back(std::move(item));
        }
        return Value::List(std::move(items), expr.kind == Expr::Kind::kTuple ? ListKind::kTuple : ListKind::kList);
      }
      case Expr::Kind::kDict: {
        DictData dict;
        for (size_t i = 0; i < expr.operands.size(); i += 2) {
          LYCHEE_ASSIGN_OR_RETURN(const Value key, Eval(*expr.operands[i], scope));
          if (!key.is(Value::Kind::kString) || key.is_markup()) {
            return Unsupported(line, "dict key other than a string");
          }
          LYCHEE_ASSIGN_OR_RETURN(Value value, Eval(*expr.operands[i + 1], scope));
          dict.Set(key.as_string(), std::move(value));
        }
        return Value::Dict(std::move(dict));
      }
      case Expr::Kind::kAttribute: {
        LYCHEE_ASSIGN_OR_RETURN(const Value object, Eval(*expr.operands[0], scope));
        return GetAttribute(object, expr.name, line);
      }
      case Expr::Kind::kItem: {
        LYCHEE_ASSIGN_OR_RETURN(const Value object, Eval(*expr.operands[0], scope));
        LYCHEE_ASSIGN_OR_RETURN(const Value key, Eval(*expr.operands[1], scope));
        return GetItem(object, key, line);
      }
      case Expr::Kind::kSlice: return EvalSlice(expr, scope);
      case Expr::Kind::kCall: {
        LYCHEE_ASSIGN_OR_RETURN(const Value callee, Eval(*expr.operands[0], scope));
        if (callee.is(Value::Kind::kUndefined)) return UndefinedError(line, callee);
        if (!callee.is(Value::Kind::kFunction)) {
          return TemplateError(line, absl::StrCat("'", TypeName(callee), "' object is not callable"));
        }
        LYCHEE_ASSIGN_OR_RETURN(const CallArgs args, EvalArguments(expr, 1, scope));
        return callee.as_function().call(args);
      }
      case Expr::Kind::kFilter: return EvalFilter(expr, Value(), scope);
      case Expr::Kind::kTest: {
        LYCHEE_ASSIGN_OR_RETURN(const Value value, Eval(*expr.operands[0], scope));
        LYCHEE_ASSIGN_OR_RETURN(const CallArgs args, EvalArguments(expr, 1, scope));
        LYCHEE_ASSIGN_OR_RETURN(const bool passes, ApplyTest(expr.name, value, args));
        return Value::Bool(passes);
      }
      case Expr::Kind::kNot: {
        LYCHEE_ASSIGN_OR_RETURN(const Value value, Eval(*expr.operands[0], scope));
        return Value::Bool(!Truthy(value));
      }
      case Expr::Kind::kNegate:
      case Expr::Kind::kPositive: {
        LYCHEE_ASSIGN_OR_RETURN(const Value value, Eval(*expr.operands[0], scope));
        if (value.is(Value::Kind::kUndefined)) return UndefinedError(line, value);
        const bool negate = expr.kind == Expr::Kind::kNegate;
        if (value.is(Value::Kind::kFloat)) return Value::Float(negate ? -value.as_double() : value.as_double());
        if (value.is_integral()) {
          return negate ? IntegerArithmetic('-', 0, value.as_int(), line) : Value::Int(value.as_int());
        }
        return TemplateError(
            line, absl::StrCat("bad operand type for unary ", negate ? "-" : "+", ": '", TypeName(value), "'"));
      }
      case Expr::Kind::kBinary: {
        LYCHEE_ASSIGN_OR_RETURN(const Value left, Eval(*expr.operands[0], scope));
        LYCHEE_ASSIGN_OR_RETURN(const Value right, Eval(*expr.operands[1], scope));
        if (expr.name == "~") {
          LYCHEE_ASSIGN_OR_RETURN(std::string text, Str(left, line));
          LYCHEE_RETURN_IF_ERROR(AppendStr(right, line, &text));
          return Value::String(std::move(text));
        }
        return Arithmetic(expr.name, left, right, line);
      }
      case Expr::Kind::kAnd:
      case Expr::Kind::kOr: {
        // Python's and/or give one of their operands, not a bool.
        LYCHEE_ASSIGN_OR_RETURN(Value left, Eval(*expr.operands[0], scope));
        if (Truthy(left) == (expr.kind == Expr::Kind::kOr)) return left;
        return Eval(*expr.operands[1], scope);
      }
      case Expr::Kind::kCompare: {
        LYCHEE_ASSIGN_OR_RETURN(Value left, Eval(*expr.operands[0], scope));
        for (size_t i = 0; i < expr.comparisons.size(); ++i) {
          LYCHEE_ASSIGN_OR_RETURN(Value right, Eval(*expr.operands[i + 1], scope));
          LYCHEE_ASSIGN_OR_RETURN(const bool holds, Compare(expr.comparisons[i], left, right, line));
          if (!holds) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case Expr::Kind::kConditional: {
        LYCHEE_ASSIGN_OR_RETURN(const Value condition, Eval(*expr.operands[1], scope));
        if (Truthy(condition)) return Eval(*expr.operands[0], scope);
        if (expr.operands[2] != nullptr) return Eval(*expr.operands[2], scope);
        return Value::Undefined(absl::StrCat("the inline if-expression on line ", line,
                                             " evaluated to false and no else section was defined."));
      }
    }
    return Value();
  }

  // Python's recursion limit stops runaway recursion in Jinja; this bounds the stack here.
  static constexpr int kMaxMacroDepth = 100;

  std::string* out_;
  int macro_depth_ = 0;
};

}  // namespace

struct Program {
  Body body;
  // The variables every render sees (the special tokens).
  DictData variables;
};

}  // namespace chat_template_internal

namespace {

using chat_template_internal::DictData;
using chat_template_internal::Value;

// Jinja reads the source with its newlines normalized to "\n" and one trailing newline dropped
// (keep_trailing_newline is off).
std::string NormalizeNewlines(std::string_view source) {
  std::string normalized;
  normalized.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      normalized.push_back('\n');
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      normalized.push_back(source[i]);
    }
  }
  if (!normalized.empty() && normalized.back() == '\n') normalized.pop_back();
  return normalized;
}

absl::StatusOr<Value> ParseJsonField(std::string_view json, absl::string_view field) {
  absl::StatusOr<Value> value = chat_template_internal::ParseJsonValue(json);
  if (!value.ok()) return absl::InvalidArgumentError(absl::StrCat(field, ": ", value.status().message()));
  return value;
}

// A JSON array of objects (tools, documents); None when `json` is empty.
absl::StatusOr<Value> ParseObjectList(std::string_view json, absl::string_view field) {
  if (json.empty()) return Value::None();
  LYCHEE_ASSIGN_OR_RETURN(Value list, ParseJsonField(json, field));
  if (!list.is(Value::Kind::kList)) return absl::InvalidArgumentError(absl::StrCat(field, " must be a JSON array"));
  for (size_t i = 0; i < list.as_list().items.size(); ++i) {
    if (!list.as_list().items[i].is(Value::Kind::kDict)) {
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "] must be a JSON object"));
    }
  }
  return list;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream contents;
  contents << file.rdbuf();
  if (file.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return contents.str();
}

}  // namespace

ChatTemplate::ChatTemplate(std::shared_ptr<const chat_template_internal::Program> program)
    : program_(std::move(program)) {}

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source, std::string_view variables_json) {
  using namespace chat_template_internal;
  if (!IsValidUtf8(source)) return absl::InvalidArgumentError("chat template is not valid UTF-8");
  LYCHEE_ASSIGN_OR_RETURN(const Value variables, ParseJsonField(variables_json, "chat template variables"));
  if (!variables.is(Value::Kind::kDict)) {
    return absl::InvalidArgumentError("chat template variables must be a JSON object");
  }
  const std::string normalized = NormalizeNewlines(source);
  LYCHEE_ASSIGN_OR_RETURN(std::vector<Token> tokens, Lexer(normalized).Tokenize());
  LYCHEE_ASSIGN_OR_RETURN(Body body, Parser(std::move(tokens)).ParseTemplate());
  auto program = std::make_shared<Program>();
  program->body = std::move(body);
  program->variables = variables.as_dict();
  return ChatTemplate(std::move(program));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& path) {
  const bool is_directory = std::filesystem::is_directory(path);
  const std::string config_path =
      is_directory ? (std::filesystem::path(path) / "tokenizer_config.json").string() : path;
  LYCHEE_ASSIGN_OR_RETURN(const std::string text, ReadFile(config_path));
  absl::StatusOr<nlohmann::json> config = ParseJson(text);
  if (!config.ok()) return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", config.status().message()));
  if (!config->is_object()) return absl::InvalidArgumentError(absl::StrCat(config_path, " is not a JSON object"));

  // transformers passes tokenizer.special_tokens_map: the special tokens that are set, as text.
  nlohmann::json variables = nlohmann::json::object();
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    const auto token = config->find(key);
    if (token == config->end() || token->is_null()) continue;
    if (token->is_string()) {
      variables[key] = *token;
    } else if (token->is_object() && token->contains("content") && (*token)["content"].is_string()) {
      variables[key] = (*token)["content"];
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path, ": ", key, " must be a string or an object with \"content\""));
    }
  }
  const auto additional = config->find("additional_special_tokens");
  if (additional != config->end() && additional->is_array() && !additional->empty()) {
    nlohmann::json tokens = nlohmann::json::array();
    for (const auto& token : *additional) {
      if (token.is_string()) {
        tokens.push_back(token);
      } else if (token.is_object() && token.contains("content") && token["content"].is_string()) {
        tokens.push_back(token["content"]);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path, ": additional_special_tokens has an entry that is not a token"));
      }
    }
    variables["additional_special_tokens"] = std::move(tokens);
  }

  // transformers saves the template as chat_template.jinja beside the config, and reads it first.
  std::string source;
  const std::string jinja_path = is_directory ? (std::filesystem::path(path) / "chat_template.jinja").string() : "";
  if (!jinja_path.empty() && std::filesystem::exists(jinja_path)) {
    LYCHEE_ASSIGN_OR_RETURN(source, ReadFile(jinja_path));
  } else {
    const auto chat_template = config->find("chat_template");
    if (chat_template == config->end() || chat_template->is_null()) {
      return absl::NotFoundError(absl::StrCat(config_path, " has no chat_template"));
    }
    if (chat_template->is_string()) {
      source = chat_template->get<std::string>();
    } else if (chat_template->is_array()) {
      // Named templates (e.g. "default", "tool_use", "rag"): apply_chat_template uses "default".
      std::vector<std::string> names;
      for (const auto& entry : *chat_template) {
        if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string() ||
            !entry.contains("template") || !entry["template"].is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(config_path, ": chat_template entries must have a name and a template"));
        }
        names.push_back(entry["name"].get<std::string>());
        if (names.back() == "default") source = entry["template"].get<std::string>();
      }
      if (std::find(names.begin(), names.end(), "default") == names.end()) {
        return absl::NotFoundError(
            absl::StrCat(config_path, " has no default chat template (it has: ", absl::StrJoin(names, ", "), ")"));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": chat_template must be a string or a list"));
    }
  }
  absl::StatusOr<ChatTemplate> parsed = Parse(source, variables.dump());
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(), absl::StrCat(config_path, ": ", parsed.status().message()));
  }
  return parsed;
}

absl::StatusOr<std::string> ChatTemplate::Render(const ChatRequest& request) const {
  using namespace chat_template_internal;
  LYCHEE_ASSIGN_OR_RETURN(const Value messages, ParseJsonField(request.messages_json, "messages"));
  if (!messages.is(Value::Kind::kList)) return absl::InvalidArgumentError("messages must be a JSON array");
  LYCHEE_ASSIGN_OR_RETURN(const Value tools, ParseObjectList(request.tools_json, "tools"));
  LYCHEE_ASSIGN_OR_RETURN(const Value documents, ParseObjectList(request.documents_json, "documents"));
  DictData variables;
  if (!request.variables_json.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(const Value parsed, ParseJsonField(request.variables_json, "template variables"));
    if (!parsed.is(Value::Kind::kDict)) return absl::InvalidArgumentError("template variables must be a JSON object");
    variables = parsed.as_dict();
  }

  std::tm now{};
  if (request.now.has_value()) {
    now = *request.now;
  } else {
    const std::time_t seconds = std::time(nullptr);
    localtime_r(&seconds, &now);
  }
  Scope globals(nullptr);
  globals.Set("raise_exception", MakeFunction("raise_exception", RaiseException));
  globals.Set("strftime_now",
              MakeFunction("strftime_now", [now](const CallArgs& args) { return StrftimeNow(now, args); }));
  globals.Set("namespace", MakeFunction("namespace", MakeNamespace));
  globals.Set("range", MakeFunction("range", Range));
  globals.Set("dict", MakeFunction("dict", MakeDict));

  // render(messages=..., tools=..., documents=..., add_generation_prompt=..., **special_tokens,
  // **variables), as apply_chat_template calls it.
  Scope context(&globals);
  for (const auto& [name, value] : program_->variables.entries) context.Set(name, value);
  context.Set("messages", messages);
  context.Set("tools", tools);
  context.Set("documents", documents);
  context.Set("add_generation_prompt", Value::Bool(request.add_generation_prompt));
  for (const auto& [name, value] : variables.entries) {
    if (name == "messages" || name == "tools" || name == "documents" || name == "add_generation_prompt") {
      return absl::InvalidArgumentError(absl::StrCat("template variables cannot set '", name, "'"));
    }
    context.Set(name, value);
  }

  std::string text;
  Renderer renderer(&text);
  LYCHEE_RETURN_IF_ERROR(renderer.Execute(program_->body, context).status());
  return text;
}

}  // namespace lychee
