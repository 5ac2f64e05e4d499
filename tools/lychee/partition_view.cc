#include "tools/lychee/partition_view.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"

namespace lychee::cli {
namespace {

// printf into a std::string, for the fixed-width columns and the numbers of both views.
template <typename... Values>
std::string Format(const char* format, Values... values) {
  const int size = std::snprintf(nullptr, 0, format, values...);
  std::string text(static_cast<size_t>(size) + 1, '\0');
  std::snprintf(text.data(), text.size(), format, values...);
  text.pop_back();
  return text;
}

using HeadGates = std::map<std::pair<int64_t, int64_t>, const HeadGateRecord*>;

HeadGates GatesByHead(const HeadPartition& partition) {
  HeadGates gates;
  for (const HeadGateRecord& gate : partition.gates) gates[{gate.layer, gate.kv_head}] = &gate;
  return gates;
}

const HeadGateRecord* GateOf(const HeadGates& gates, int64_t layer, int64_t kv_head) {
  const auto found = gates.find({layer, kv_head});
  return found == gates.end() ? nullptr : found->second;
}

bool IsRetrieval(const HeadPartition& partition, int64_t layer, int64_t kv_head) {
  return partition.role(layer, kv_head) == HeadRole::kRetrieval;
}

std::string VersionText(const HeadPartition& partition) {
  if (partition.version == 0) return "unpublished partition";
  return absl::StrCat("partition version ", partition.version);
}

std::string SelectionText(const HeadPartition& partition) {
  const SelectionParams& s = partition.selection();
  return absl::StrCat("block ", s.block_size, ", budget ", s.token_budget, ", sink ", s.sink_tokens, ", recent ",
                      s.recent_tokens, " tokens");
}

// ---- SVG ----

// Length of the UTF-8 sequence that starts `text` at `at` when it encodes a character XML 1.0
// allows, else 0.
size_t XmlCharLength(const std::string& text, size_t at) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(at);
  if (lead < 0x80) return (lead >= 0x20 || lead == '\t' || lead == '\n' || lead == '\r') ? 1 : 0;
  size_t length;
  uint32_t code;
  if ((lead & 0xe0) == 0xc0) {
    length = 2, code = lead & 0x1f;
  } else if ((lead & 0xf0) == 0xe0) {
    length = 3, code = lead & 0x0f;
  } else if ((lead & 0xf8) == 0xf0) {
    length = 4, code = lead & 0x07;
  } else {
    return 0;
  }
  if (at + length > text.size()) return 0;
  for (size_t i = 1; i < length; ++i) {
    if ((byte(at + i) & 0xc0) != 0x80) return 0;
    code = (code << 6) | (byte(at + i) & 0x3f);
  }
  constexpr uint32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};
  const bool overlong = code < kSmallest[length];
  const bool surrogate = code >= 0xd800 && code <= 0xdfff;
  if (overlong || surrogate || code == 0xfffe || code == 0xffff || code > 0x10ffff) return 0;
  return length;
}

// Text for XML character data and attribute values: markup characters become entities, and
// bytes that are not a character XML allows (control characters, broken UTF-8) become U+FFFD.
std::string EscapeXml(const std::string& text) {
  std::string escaped;
  for (size_t at = 0; at < text.size();) {
    const size_t length = XmlCharLength(text, at);
    if (length == 0) {
      escaped += "\xef\xbf\xbd";
      ++at;
      continue;
    }
    switch (text[at]) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      case '\'': escaped += "&apos;"; break;
      default: escaped.append(text, at, length);
    }
    at += length;
  }
  return escaped;
}

// Viridis at five stops, interpolated in RGB: perceptually even enough for a legend, and legible
// for the colour-blind.
constexpr double kScaleStops[][3] = {
    {0x44, 0x01, 0x54}, {0x3b, 0x52, 0x8b}, {0x21, 0x91, 0x8c}, {0x5e, 0xc9, 0x62}, {0xfd, 0xe7, 0x25}};
constexpr int kScaleSegments = 4;

std::string ScaleColour(double value) {
  value = std::clamp(value, 0.0, 1.0);
  const int segment = std::min(static_cast<int>(value * kScaleSegments), kScaleSegments - 1);
  const double t = value * kScaleSegments - segment;
  int rgb[3];
  for (int c = 0; c < 3; ++c) {
    rgb[c] = static_cast<int>(kScaleStops[segment][c] + t * (kScaleStops[segment + 1][c] - kScaleStops[segment][c]) + 0.5);
  }
  return Format("#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
}

// Dark cells (the low half of viridis) take white letters.
std::string LetterColour(double value) { return value < 0.55 ? "#ffffff" : "#000000"; }

constexpr char kMarkColour[] = "#e4002b";

struct SvgLayout {
  int cell_width;
  int cell_height;
  bool letters;  // room for a letter in every cell
  int grid_x = 72;
  int grid_y = 104;
  int grid_width;
  int grid_height;
  int legend_x;
  int width;
  int height;
};

// A generous width of (bold) sans-serif text at `font_size`, for sizing the canvas to the titles.
int TextWidth(const std::string& text, int font_size) { return static_cast<int>(text.size() * font_size * 0.64); }

SvgLayout Layout(const HeadPartition& partition, const std::string& title, const std::string& subtitle) {
  SvgLayout layout;
  layout.cell_width = partition.num_kv_heads() > 32 ? 20 : 44;
  layout.cell_height = partition.num_layers() > 48 ? 14 : 26;
  layout.letters = layout.cell_width >= 20 && layout.cell_height >= 14;
  layout.grid_width = static_cast<int>(partition.num_kv_heads()) * layout.cell_width;
  layout.grid_height = static_cast<int>(partition.num_layers()) * layout.cell_height;
  layout.legend_x = layout.grid_x + layout.grid_width + 36;
  constexpr int kLegendWidth = 230;
  constexpr int kLegendHeight = 250;
  layout.width = std::max({layout.legend_x + kLegendWidth, 20 + TextWidth(title, 16), 20 + TextWidth(subtitle, 12)});
  layout.height = layout.grid_y + std::max(layout.grid_height, kLegendHeight) + 24;
  return layout;
}

std::string Rect(double x, double y, double width, double height, const std::string& attributes) {
  return Format("<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" ", x, y, width, height) + attributes;
}

std::string Text(double x, double y, const std::string& attributes, const std::string& text) {
  return Format("<text x=\"%g\" y=\"%g\" ", x, y) + attributes + ">" + EscapeXml(text) + "</text>\n";
}

void AppendLegend(const SvgLayout& layout, std::string& svg) {
  const int x = layout.legend_x;
  int y = layout.grid_y;
  svg += "<g id=\"legend\">\n";
  svg += Text(x, y - 8, "font-weight=\"bold\"", "gate Kumaraswamy mean");
  constexpr int kBarWidth = 18;
  constexpr int kBarHeight = 120;
  svg += Rect(x, y, kBarWidth, kBarHeight, "fill=\"url(#gate-scale)\" stroke=\"#666666\"/>\n");
  for (const double value : {1.0, 0.5, 0.0}) {
    const double tick_y = y + (1.0 - value) * kBarHeight;
    svg += Format("<line x1=\"%d\" y1=\"%g\" x2=\"%d\" y2=\"%g\" stroke=\"#666666\"/>\n", x + kBarWidth, tick_y,
                  x + kBarWidth + 4, tick_y);
    svg += Text(x + kBarWidth + 8, tick_y + 4, "", Format("%.1f", value));
  }
  y += kBarHeight + 22;
  svg += Text(x, y, "font-size=\"11\"", "no gate (hand-made, layer 0):");
  svg += Text(x, y + 14, "font-size=\"11\"", "1 if retrieval, 0 if sparse");
  y += 32;
  svg += Rect(x + 1.5, y + 1.5, 23, 15, absl::StrCat("fill=\"", ScaleColour(1.0), "\" stroke=\"", kMarkColour,
                                                     "\" stroke-width=\"3\"/>\n"));
  svg += Text(x + 13, y + 13, "text-anchor=\"middle\" font-size=\"11\" font-weight=\"bold\"", "R");
  svg += Text(x + 34, y + 13, "", "retrieval head (dense)");
  y += 26;
  svg += Rect(x, y, 26, 18, absl::StrCat("fill=\"", ScaleColour(0.0), "\"/>\n"));
  svg += Text(x + 13, y + 13, "text-anchor=\"middle\" font-size=\"11\" fill=\"#ffffff\"", "S");
  svg += Text(x + 34, y + 13, "", "sparse head");
  svg += "</g>\n";
}

}  // namespace

std::string RenderPartitionMap(const HeadPartition& partition) {
  std::string map = absl::StrCat(VersionText(partition), ", density ", Format("%.3f", partition.RetrievalDensity()),
                                 ", ", SelectionText(partition));
  if (!partition.source.empty()) absl::StrAppend(&map, "; source: ", partition.source);
  map += "\n\n";
  // Each cell: R (retrieval) or S (sparse), with the gate's Kumaraswamy mean when it was learned.
  const HeadGates gates = GatesByHead(partition);
  map += "layer \\ KV head";
  for (int64_t head = 0; head < partition.num_kv_heads(); ++head) map += Format(" %6lld", static_cast<long long>(head));
  map += "\n";
  for (int64_t layer = 0; layer < partition.num_layers(); ++layer) {
    map += Format("%15lld", static_cast<long long>(layer));
    for (int64_t head = 0; head < partition.num_kv_heads(); ++head) {
      const char role = IsRetrieval(partition, layer, head) ? 'R' : 'S';
      const HeadGateRecord* gate = GateOf(gates, layer, head);
      map += gate == nullptr ? Format(" %6c", role) : Format("  %c%.2f", role, gate->kuma_mean);
    }
    map += "\n";
  }
  map += Format("\nR retrieval (dense), S sparse; retrieval density outside layer 0: %.3f\n",
                partition.RetrievalDensity());
  return map;
}

std::string RenderPartitionSvg(const HeadPartition& partition) {
  std::string title =
      absl::StrCat(VersionText(partition), ", density ", Format("%.3f", partition.RetrievalDensity()));
  if (!partition.source.empty()) absl::StrAppend(&title, ": ", partition.source);
  const std::string subtitle =
      absl::StrCat("density: share of retrieval heads outside layer 0; selection: ", SelectionText(partition));
  const SvgLayout layout = Layout(partition, title, subtitle);
  const HeadGates gates = GatesByHead(partition);

  std::string svg = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  svg += Format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
      "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n",
      layout.width, layout.height, layout.width, layout.height);
  svg += "<title>" + EscapeXml(title) + "</title>\n";
  svg += "<defs>\n<linearGradient id=\"gate-scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n";
  for (int stop = 0; stop <= kScaleSegments; ++stop) {
    const double value = static_cast<double>(stop) / kScaleSegments;
    svg += Format("<stop offset=\"%g\" stop-color=\"%s\"/>\n", value, ScaleColour(value).c_str());
  }
  svg += "</linearGradient>\n</defs>\n";
  svg += Rect(0, 0, layout.width, layout.height, "fill=\"#ffffff\"/>\n");
  svg += Text(12, 26, "font-size=\"16\" font-weight=\"bold\"", title);
  svg += Text(12, 46, "", subtitle);

  // Axes: KV heads along the top, layers down the left.
  const double grid_center_x = layout.grid_x + layout.grid_width / 2.0;
  const double grid_center_y = layout.grid_y + layout.grid_height / 2.0;
  svg += Text(grid_center_x, layout.grid_y - 28, "text-anchor=\"middle\" font-weight=\"bold\"", "KV head");
  svg += Format("<text x=\"22\" y=\"%g\" text-anchor=\"middle\" font-weight=\"bold\" transform=\"rotate(-90 22 %g)\">",
                grid_center_y, grid_center_y) +
         "layer</text>\n";
  const std::string axis_font = layout.cell_height < 20 || layout.cell_width < 44 ? "font-size=\"9\" " : "";
  for (int64_t head = 0; head < partition.num_kv_heads(); ++head) {
    svg += Text(layout.grid_x + (head + 0.5) * layout.cell_width, layout.grid_y - 8,
                axis_font + "text-anchor=\"middle\"", std::to_string(head));
  }
  for (int64_t layer = 0; layer < partition.num_layers(); ++layer) {
    svg += Text(layout.grid_x - 8, layout.grid_y + (layer + 0.5) * layout.cell_height + 4,
                axis_font + "text-anchor=\"end\"", std::to_string(layer));
  }

  svg += "<g id=\"cells\">\n";
  std::string marks = "<g id=\"retrieval-marks\">\n";
  for (int64_t layer = 0; layer < partition.num_layers(); ++layer) {
    for (int64_t head = 0; head < partition.num_kv_heads(); ++head) {
      const bool retrieval = IsRetrieval(partition, layer, head);
      const HeadGateRecord* gate = GateOf(gates, layer, head);
      const double value = gate != nullptr ? gate->kuma_mean : (retrieval ? 1.0 : 0.0);
      const double x = layout.grid_x + static_cast<double>(head) * layout.cell_width;
      const double y = layout.grid_y + static_cast<double>(layer) * layout.cell_height;
      std::string tooltip = absl::StrCat("layer ", layer, ", KV head ", head, ": ", retrieval ? "retrieval" : "sparse");
      tooltip += gate != nullptr ? Format(", gate mean %.4f (a %.4g, b %.4g)", gate->kuma_mean, gate->a, gate->b)
                                 : std::string(", no gate");
      svg += Rect(x, y, layout.cell_width, layout.cell_height,
                  Format("class=\"cell\" data-layer=\"%lld\" data-kv-head=\"%lld\" data-role=\"%s\" fill=\"%s\" "
                         "stroke=\"#ffffff\" stroke-width=\"1\">",
                         static_cast<long long>(layer), static_cast<long long>(head),
                         retrieval ? "retrieval" : "sparse", ScaleColour(value).c_str()));
      svg += "<title>" + EscapeXml(tooltip) + "</title></rect>\n";
      if (layout.letters) {
        svg += Text(x + layout.cell_width / 2.0, y + layout.cell_height / 2.0 + 4,
                    absl::StrCat(axis_font, "text-anchor=\"middle\" fill=\"", LetterColour(value), "\"",
                                 retrieval ? " font-weight=\"bold\"" : ""),
                    retrieval ? "R" : "S");
      }
      // Inset by half the stroke so that neighbouring marks do not overlap.
      if (retrieval) {
        marks += Rect(x + 1.5, y + 1.5, layout.cell_width - 3, layout.cell_height - 3,
                      absl::StrCat("class=\"retrieval-mark\" fill=\"none\" stroke=\"", kMarkColour,
                                   "\" stroke-width=\"3\"/>\n"));
      }
    }
  }
  svg += "</g>\n" + marks + "</g>\n";
  AppendLegend(layout, svg);
  svg += "</svg>\n";
  return svg;
}

}  // namespace lychee::cli
