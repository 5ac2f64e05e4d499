// A small XML well-formedness check for the documents the tools write (SVG): one root element,
// balanced and properly nested tags, quoted and unique attributes, and character data and
// attribute values in which '<' never appears and '&' only starts an entity. Not a validating
// parser: enough to catch markup that a browser would refuse.
#pragma once

#include <cctype>
#include <set>
#include <string>
#include <vector>

namespace lychee::testing {

namespace xml_check_detail {

inline bool IsNameChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':' || c == '-' || c == '.';
}

// "" when every '&' in `text` starts an entity and no '<' appears, else what is wrong.
inline std::string CheckCharacterData(const std::string& text) {
  if (text.find('<') != std::string::npos) return "a raw '<' in: " + text;
  static const char* const kEntities[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"};
  for (size_t at = text.find('&'); at != std::string::npos; at = text.find('&', at + 1)) {
    bool known = text.compare(at, 2, "&#") == 0 && text.find(';', at) != std::string::npos;
    for (const char* entity : kEntities) known = known || text.compare(at, std::char_traits<char>::length(entity), entity) == 0;
    if (!known) return "a raw '&' in: " + text;
  }
  return "";
}

}  // namespace xml_check_detail

// "" when `xml` is well-formed, else the first problem found and where.
inline std::string XmlProblem(const std::string& xml) {
  using namespace xml_check_detail;
  std::vector<std::string> open;
  int roots = 0;
  size_t at = 0;
  if (xml.compare(0, 5, "<?xml") == 0) {
    at = xml.find("?>");
    if (at == std::string::npos) return "unterminated XML declaration";
    at += 2;
  }
  while (at < xml.size()) {
    const size_t tag = xml.find('<', at);
    const std::string text = xml.substr(at, tag == std::string::npos ? std::string::npos : tag - at);
    if (open.empty() && text.find_first_not_of(" \t\r\n") != std::string::npos) {
      return "text outside the root element at byte " + std::to_string(at);
    }
    if (const std::string problem = CheckCharacterData(text); !problem.empty()) return problem;
    if (tag == std::string::npos) break;
    at = tag;
    if (xml.compare(at, 4, "<!--") == 0) {
      const size_t end = xml.find("-->", at);
      if (end == std::string::npos) return "unterminated comment";
      at = end + 3;
      continue;
    }
    const bool closing = xml.compare(at, 2, "</") == 0;
    at += closing ? 2 : 1;
    const size_t name_start = at;
    while (at < xml.size() && IsNameChar(xml[at])) ++at;
    const std::string name = xml.substr(name_start, at - name_start);
    if (name.empty() || !(std::isalpha(static_cast<unsigned char>(name[0])) || name[0] == '_')) {
      return "a bad tag name at byte " + std::to_string(name_start);
    }
    if (closing) {
      while (at < xml.size() && std::isspace(static_cast<unsigned char>(xml[at]))) ++at;
      if (at >= xml.size() || xml[at] != '>') return "unterminated end tag </" + name;
      if (open.empty() || open.back() != name) {
        return "</" + name + "> closes " + (open.empty() ? std::string("nothing") : "<" + open.back() + ">");
      }
      open.pop_back();
      ++at;
      continue;
    }
    std::set<std::string> attributes;
    while (true) {
      const size_t before_space = at;
      while (at < xml.size() && std::isspace(static_cast<unsigned char>(xml[at]))) ++at;
      if (at >= xml.size()) return "unterminated tag <" + name;
      if (xml.compare(at, 2, "/>") == 0 || xml[at] == '>') break;
      if (at == before_space) return "no space before an attribute of <" + name + ">";
      const size_t attribute_start = at;
      while (at < xml.size() && IsNameChar(xml[at])) ++at;
      const std::string attribute = xml.substr(attribute_start, at - attribute_start);
      if (attribute.empty()) return "a bad attribute in <" + name + "> at byte " + std::to_string(attribute_start);
      if (!attributes.insert(attribute).second) return "attribute " + attribute + " twice in <" + name + ">";
      if (at + 1 >= xml.size() || xml[at] != '=' || (xml[at + 1] != '"' && xml[at + 1] != '\'')) {
        return "attribute " + attribute + " of <" + name + "> is not name=\"value\"";
      }
      const char quote = xml[at + 1];
      const size_t value_end = xml.find(quote, at + 2);
      if (value_end == std::string::npos) return "unterminated value of " + attribute;
      if (const std::string problem = CheckCharacterData(xml.substr(at + 2, value_end - at - 2)); !problem.empty()) {
        return "attribute " + attribute + " of <" + name + ">: " + problem;
      }
      at = value_end + 1;
    }
    const bool self_closing = xml[at] == '/';
    at += self_closing ? 2 : 1;
    if (open.empty() && ++roots > 1) return "a second root element <" + name + ">";
    if (!self_closing) open.push_back(name);
  }
  if (!open.empty()) return "<" + open.back() + "> is never closed";
  if (roots != 1) return "no root element";
  return "";
}

}  // namespace lychee::testing
