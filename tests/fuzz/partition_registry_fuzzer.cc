// ParseStoredPartition on arbitrary files of the partition registry (what PartitionStore::Open
// reads every stored version with). A random change almost never keeps the SHA-256 right, so the
// input is also resealed: its payload (after the record header when it has one) gets a correct
// header, which takes the fuzzer past the checksum into the payload's decoding.
#include <google/protobuf/stubs/logging.h>

#include <cstdint>
#include <string>

#include "common/base/durable_file.h"
#include "common/base/partition_store.h"
#include "lychee/v1/head_partition.pb.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

// Magic, payload length, SHA-256: what EncodeDurableRecord puts before the payload.
constexpr size_t kRecordHeaderSize = 8 + 8 + 32;

void CheckStoredPartition(std::string_view record) {
  const std::string path = "000000000001.partition";
  auto partition = lychee::ParseStoredPartition(record, path);
  auto payload = lychee::DecodeDurableRecord(record, path);
  if (!payload.ok()) {
    LYCHEE_FUZZ_CHECK(!partition.ok());
    return;
  }
  // A record is the encoding of its payload and nothing else.
  LYCHEE_FUZZ_CHECK(lychee::EncodeDurableRecord(*payload) == record);
  if (!partition.ok()) return;
  LYCHEE_FUZZ_CHECK(partition->Validate().ok());
  // Stored again as PartitionStore::Publish stores it, it reads back the same.
  const std::string stored = lychee::EncodeDurableRecord(lychee::HeadPartitionToProto(*partition).SerializeAsString());
  lychee::fuzz::CheckSamePartition(lychee::ParseStoredPartition(stored, path), *partition, "storing again");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input = lychee::fuzz::AsText(data, size);
  CheckStoredPartition(input);
  const bool has_header = input.size() >= kRecordHeaderSize && input.substr(0, 8) == "LYCHDUR1";
  const std::string_view payload = has_header ? input.substr(kRecordHeaderSize) : input;
  const std::string resealed = lychee::EncodeDurableRecord(payload);
  LYCHEE_FUZZ_CHECK(lychee::DecodeDurableRecord(resealed, "resealed").value() == payload);
  CheckStoredPartition(resealed);
  return 0;
}
