// HeadPartitionFromProto on arbitrary lychee.v1.HeadPartition bytes, as they arrive over gRPC.
// A partition it accepts is valid and survives the trips the services make it take: to proto
// and back, to the JSON people edit and back.
#include <google/protobuf/stubs/logging.h>

#include <cstdint>

#include "common/base/head_partition.h"
#include "lychee/v1/head_partition.pb.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field that is not UTF-8; the parse failing is what counts.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lychee::v1::HeadPartition proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto partition = lychee::HeadPartitionFromProto(proto);
  if (!partition.ok()) return 0;
  LYCHEE_FUZZ_CHECK(partition->Validate().ok());
  const double density = partition->RetrievalDensity();
  LYCHEE_FUZZ_CHECK(density >= 0 && density <= 1);

  lychee::fuzz::CheckSamePartition(lychee::HeadPartitionFromProto(lychee::HeadPartitionToProto(*partition)),
                                   *partition, "to proto and back");
  auto json = lychee::HeadPartitionToJson(*partition);
  LYCHEE_FUZZ_CHECK(json.ok());
  lychee::fuzz::CheckSamePartition(lychee::HeadPartitionFromJson(*json, "round trip"), *partition,
                                   "to JSON and back");
  return 0;
}
