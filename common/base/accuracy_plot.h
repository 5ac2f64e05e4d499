// The SVG plot of retrieval accuracy against KV bytes read per decoded token that `lychee eval
// --plot` and `lychee watch --plot` (a sweep's table) write: hand-written SVG text. Free of LibTorch.
#pragma once

#include <string>
#include <vector>

namespace lychee {

// One panel per task (accuracy against KV bytes on a log scale), one colour per series, each point
// labelled; a series of more than one point is joined in the order given.
struct AccuracyPlotPoint {
  std::string task;
  double kv_bytes_per_token = 0;  // > 0, or the point is left out
  double accuracy = 0;
  std::string label;  // beside the point
  std::string title;  // its tooltip
};
struct AccuracyPlotSeries {
  std::string name;
  std::vector<AccuracyPlotPoint> points;
};
std::string AccuracyPlotSvg(const std::vector<AccuracyPlotSeries>& series);

// "12.6 MB", "3.1 kB", "512 B".
std::string FormatByteCount(double bytes);

}  // namespace lychee
