#include "common/base/accuracy_plot.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace lychee {
namespace {

std::string XmlEscape(const std::string& text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      default: escaped += c;
    }
  }
  return escaped;
}

}  // namespace

std::string FormatByteCount(double bytes) {
  if (bytes >= 1e6) return absl::StrFormat("%.2f MB", bytes / 1e6);
  if (bytes >= 1e3) return absl::StrFormat("%.1f kB", bytes / 1e3);
  return absl::StrFormat("%.0f B", bytes);
}

std::string AccuracyPlotSvg(const std::vector<AccuracyPlotSeries>& series) {
  static const char* const kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                        "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
  std::vector<std::string> tasks;
  double low = INFINITY, high = 0;
  for (const AccuracyPlotSeries& s : series) {
    for (const AccuracyPlotPoint& point : s.points) {
      if (std::find(tasks.begin(), tasks.end(), point.task) == tasks.end()) tasks.push_back(point.task);
      if (point.kv_bytes_per_token > 0) {
        low = std::min(low, point.kv_bytes_per_token);
        high = std::max(high, point.kv_bytes_per_token);
      }
    }
  }
  if (!(high > 0)) low = 1, high = 10;
  // Whole decades around the data.
  const double decade_low = std::floor(std::log10(low));
  const double decade_high = std::max(decade_low + 1, std::ceil(std::log10(high)));
  const int panel_width = 380, panel_height = 280, left = 60, top = 40, plot_width = 290, plot_height = 190;
  const int legend_height = 24 + 18 * static_cast<int>(series.size());
  const int width = panel_width * static_cast<int>(std::max<size_t>(1, tasks.size()));
  const int height = panel_height + legend_height;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
      "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
      width, height);
  auto x_of = [&](double bytes) { return (std::log10(bytes) - decade_low) / (decade_high - decade_low) * plot_width; };
  for (size_t t = 0; t < tasks.size(); ++t) {
    const int x0 = static_cast<int>(t) * panel_width + left;
    const int y0 = top;
    absl::StrAppendFormat(&svg, "<text x=\"%d\" y=\"%d\" font-size=\"13\" font-weight=\"bold\">%s</text>\n", x0,
                          y0 - 14, XmlEscape(tasks[t]));
    absl::StrAppendFormat(&svg, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#444\"/>\n",
                          x0, y0, plot_width, plot_height);
    for (int tick = 0; tick <= 4; ++tick) {
      const double y = y0 + plot_height - tick * plot_height / 4.0;
      absl::StrAppendFormat(&svg,
                            "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                            "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.2f</text>\n",
                            x0, y, x0 + plot_width, y, x0 - 4, y + 4, tick / 4.0);
    }
    for (double decade = decade_low; decade <= decade_high; ++decade) {
      const double x = x0 + x_of(std::pow(10.0, decade));
      absl::StrAppendFormat(&svg,
                            "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ddd\"/>"
                            "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n",
                            x, y0, x, y0 + plot_height, x, y0 + plot_height + 14,
                            FormatByteCount(std::pow(10.0, decade)));
    }
    absl::StrAppendFormat(&svg, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">KV bytes read per token</text>\n",
                          x0 + plot_width / 2, y0 + plot_height + 30);
    absl::StrAppendFormat(
        &svg, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(-90 %d %d)\">accuracy</text>\n",
        x0 - 38, y0 + plot_height / 2, x0 - 38, y0 + plot_height / 2);
    for (size_t s = 0; s < series.size(); ++s) {
      const char* color = kColors[s % (sizeof(kColors) / sizeof(kColors[0]))];
      std::string points;
      int drawn = 0;
      for (const AccuracyPlotPoint& point : series[s].points) {
        if (point.task != tasks[t] || !(point.kv_bytes_per_token > 0)) continue;
        const double x = x0 + x_of(point.kv_bytes_per_token);
        const double y = y0 + plot_height * (1.0 - point.accuracy);
        absl::StrAppendFormat(&points, "%.1f,%.1f ", x, y);
        ++drawn;
        absl::StrAppendFormat(&svg,
                              "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"><title>%s</title>"
                              "</circle><text x=\"%.1f\" y=\"%.1f\" font-size=\"9\" fill=\"%s\">%s</text>\n",
                              x, y, color, XmlEscape(point.title), x + 4, y - 4, color, XmlEscape(point.label));
      }
      if (drawn > 1) {
        absl::StrAppendFormat(&svg, "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"/>\n",
                              points, color);
      }
    }
  }
  for (size_t s = 0; s < series.size(); ++s) {
    const int y = panel_height + 16 + 18 * static_cast<int>(s);
    const char* color = kColors[s % (sizeof(kColors) / sizeof(kColors[0]))];
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>"
                          "<text x=\"%d\" y=\"%d\">%s</text>\n",
                          left, y, left + 24, y, color, left + 30, y + 4, XmlEscape(series[s].name));
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace lychee
