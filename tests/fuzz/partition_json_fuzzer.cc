// HeadPartitionFromJson on arbitrary text: the partition files people write by hand and pass
// with --partition. One it accepts is valid and comes back unchanged from JSON and proto.
#include <google/protobuf/stubs/logging.h>

#include <cstdint>

#include "common/base/head_partition.h"
#include "lychee/v1/head_partition.pb.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto partition = lychee::HeadPartitionFromJson(lychee::fuzz::AsText(data, size), "partition.json");
  if (!partition.ok()) return 0;
  LYCHEE_FUZZ_CHECK(partition->Validate().ok());

  auto json = lychee::HeadPartitionToJson(*partition);
  LYCHEE_FUZZ_CHECK(json.ok());
  lychee::fuzz::CheckSamePartition(lychee::HeadPartitionFromJson(*json, "round trip"), *partition,
                                   "to JSON and back");
  lychee::fuzz::CheckSamePartition(lychee::HeadPartitionFromProto(lychee::HeadPartitionToProto(*partition)),
                                   *partition, "to proto and back");
  return 0;
}
