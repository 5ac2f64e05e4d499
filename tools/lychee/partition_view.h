// Views of a head partition for people: the layer-by-KV-head map that `lychee partition` prints
// on a terminal, and a standalone SVG heatmap of the same. Free of LibTorch and gRPC.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "common/base/head_partition.h"

namespace lychee::cli {

// A header line (version, source, density, selection), one row per layer with R (retrieval) or
// S (sparse) per KV head, followed by the gate's Kumaraswamy mean where the partition was
// learned, and a legend line.
std::string RenderPartitionMap(const HeadPartition& partition);

// An SVG document: layers as rows, KV heads as columns. A cell's colour is its gate's
// Kumaraswamy mean on a colour scale; heads without a gate take the scale's end for their role
// (1 retrieval, 0 sparse). Retrieval heads are outlined and lettered R. Every cell is a
// <rect class="cell"> with data-layer, data-kv-head and data-role attributes, and every mark
// a <rect class="retrieval-mark">, so that tools and tests can read the picture back.
std::string RenderPartitionSvg(const HeadPartition& partition);

}  // namespace lychee::cli
