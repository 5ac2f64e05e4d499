#include "inference/rank_mirror.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/model.h"
#include "common/model/torch_errors.h"
#include "inference/engine.h"
#include "inference/kv_cache_manager.h"
#include "inference/shadow_validator.h"
#include "kernels/policy_backend.h"
#include "lychee/v1/head_partition.pb.h"

namespace lychee {
namespace {

// The command's bytes, in this host's byte order: every rank runs on this host.
class CommandWriter {
 public:
  template <typename T>
  void Put(T value) {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes_.append(reinterpret_cast<const char*>(&value), sizeof(value));
  }
  template <typename T>
  void PutVector(const std::vector<T>& values) {
    Put<uint64_t>(values.size());
    for (const T& value : values) Put(value);
  }
  void PutString(const std::string& value) {
    Put<uint64_t>(value.size());
    bytes_.append(value);
  }
  std::string Take() { return std::move(bytes_); }

 private:
  std::string bytes_;
};

class CommandReader {
 public:
  explicit CommandReader(std::string_view bytes) : bytes_(bytes) {}

  template <typename T>
  absl::StatusOr<T> Get() {
    static_assert(std::is_trivially_copyable_v<T>);
    if (bytes_.size() < sizeof(T)) return Truncated();
    T value;
    std::memcpy(&value, bytes_.data(), sizeof(T));
    bytes_.remove_prefix(sizeof(T));
    return value;
  }
  template <typename T>
  absl::StatusOr<std::vector<T>> GetVector() {
    LYCHEE_ASSIGN_OR_RETURN(const uint64_t size, Get<uint64_t>());
    if (size > bytes_.size() / sizeof(T)) return Truncated();
    std::vector<T> values(size);
    for (T& value : values) {
      LYCHEE_ASSIGN_OR_RETURN(value, Get<T>());
    }
    return values;
  }
  absl::StatusOr<std::string> GetString() {
    LYCHEE_ASSIGN_OR_RETURN(const uint64_t size, Get<uint64_t>());
    if (size > bytes_.size()) return Truncated();
    std::string value(bytes_.substr(0, size));
    bytes_.remove_prefix(size);
    return value;
  }
  bool done() const { return bytes_.empty(); }

 private:
  static absl::Status Truncated() { return absl::InvalidArgumentError("rank command: truncated"); }

  std::string_view bytes_;
};

// The op of a command whose ops run from `first` to `last`; `what` names the command in the error.
template <typename Op>
absl::StatusOr<Op> GetOp(CommandReader& in, Op first, Op last, absl::string_view what) {
  LYCHEE_ASSIGN_OR_RETURN(const uint8_t op, in.Get<uint8_t>());
  if (op < static_cast<uint8_t>(first) || op > static_cast<uint8_t>(last)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": unknown op ", op));
  }
  return static_cast<Op>(op);
}

void PutPolicy(const PolicySpec& spec, CommandWriter& out) {
  out.Put(static_cast<int32_t>(spec.kind));
  out.Put<bool>(spec.partition_version.has_value());
  out.Put<uint64_t>(spec.partition_version.value_or(0));
  for (bool selected : {spec.from_partition.token_budget, spec.from_partition.block_size,
                        spec.from_partition.sink_tokens, spec.from_partition.recent_tokens}) {
    out.Put(selected);
  }
  for (int64_t value : {spec.token_budget, spec.block_size, spec.sink_tokens, spec.recent_tokens}) out.Put(value);
  out.Put(spec.p1);
  out.Put(spec.p2);
  for (int64_t value : {spec.clusters, spec.kmeans_iterations, spec.tail_tokens}) out.Put(value);
  for (bool selector : {spec.prhs_selectors.temporal, spec.prhs_selectors.recency, spec.prhs_selectors.cross_layer}) {
    out.Put(selector);
  }
  for (int64_t value : {spec.prhs_enlargement, spec.prhs_window}) out.Put(value);
  out.PutVector(spec.tidal_selection_layers);
  for (int64_t value : {spec.page_size, spec.quest_dense_layers}) out.Put(value);
  out.Put(spec.audit);
  out.Put(spec.audit_every);
  // Every parameter the policy uses, as the engine tells backends apart: GetPolicy checks that the
  // fields above carried them all, so that a PolicySpec field missing here fails loudly.
  out.PutString(spec.Describe());
}

absl::StatusOr<PolicySpec> GetPolicy(CommandReader& in) {
  PolicySpec spec;
  LYCHEE_ASSIGN_OR_RETURN(const int32_t kind, in.Get<int32_t>());
  spec.kind = static_cast<PolicyKind>(kind);
  LYCHEE_ASSIGN_OR_RETURN(const bool pinned, in.Get<bool>());
  LYCHEE_ASSIGN_OR_RETURN(const uint64_t pinned_version, in.Get<uint64_t>());
  if (pinned) spec.partition_version = pinned_version;
  for (bool* selected : {&spec.from_partition.token_budget, &spec.from_partition.block_size,
                         &spec.from_partition.sink_tokens, &spec.from_partition.recent_tokens}) {
    LYCHEE_ASSIGN_OR_RETURN(*selected, in.Get<bool>());
  }
  for (int64_t* value : {&spec.token_budget, &spec.block_size, &spec.sink_tokens, &spec.recent_tokens}) {
    LYCHEE_ASSIGN_OR_RETURN(*value, in.Get<int64_t>());
  }
  LYCHEE_ASSIGN_OR_RETURN(spec.p1, in.Get<double>());
  LYCHEE_ASSIGN_OR_RETURN(spec.p2, in.Get<double>());
  for (int64_t* value : {&spec.clusters, &spec.kmeans_iterations, &spec.tail_tokens}) {
    LYCHEE_ASSIGN_OR_RETURN(*value, in.Get<int64_t>());
  }
  for (bool* selector :
       {&spec.prhs_selectors.temporal, &spec.prhs_selectors.recency, &spec.prhs_selectors.cross_layer}) {
    LYCHEE_ASSIGN_OR_RETURN(*selector, in.Get<bool>());
  }
  for (int64_t* value : {&spec.prhs_enlargement, &spec.prhs_window}) {
    LYCHEE_ASSIGN_OR_RETURN(*value, in.Get<int64_t>());
  }
  LYCHEE_ASSIGN_OR_RETURN(spec.tidal_selection_layers, in.GetVector<int64_t>());
  for (int64_t* value : {&spec.page_size, &spec.quest_dense_layers}) {
    LYCHEE_ASSIGN_OR_RETURN(*value, in.Get<int64_t>());
  }
  LYCHEE_ASSIGN_OR_RETURN(spec.audit, in.Get<bool>());
  LYCHEE_ASSIGN_OR_RETURN(spec.audit_every, in.Get<int64_t>());
  LYCHEE_ASSIGN_OR_RETURN(const std::string sent, in.GetString());
  if (const std::string arrived = spec.Describe(); arrived != sent) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank command: the policy arrived as \"", arrived, "\" but rank 0 sent \"", sent, "\""));
  }
  return spec;
}

// Runs a step that may throw (a collective throws CollectiveError) and returns its status.
template <typename Step>
absl::Status Caught(absl::string_view name, const Step& step) {
  try {
    return step();
  } catch (const std::exception& error) {
    return StatusFromException(error, name);
  }
}

// What a follower holds for one request.
struct FollowedRequest {
  std::shared_ptr<const AttentionBackend> backend;
  // Null while the request is preempted.
  std::unique_ptr<Sequence> sequence;
};

class Follower {
 public:
  Follower(const Model& model, std::shared_ptr<KvPool> pool, std::unique_ptr<ShardBackends> backends,
           const DecodeOptions& decode_options)
      : model_(model),
        group_(*model.options().tensor_parallel),
        pool_(std::move(pool)),
        backends_(std::move(backends)),
        context_(decode_options) {}

  absl::Status Run() {
    while (true) {
      std::string bytes;
      LYCHEE_RETURN_IF_ERROR(BroadcastBytes(group_, bytes, "waiting for rank 0's command"));
      LYCHEE_ASSIGN_OR_RETURN(const RankCommand command, DecodeRankCommand(bytes));
      if (command.op == RankOp::kShutdown) return absl::OkStatus();
      // A command this rank cannot follow ends it, which makes rank 0's next collective fail at once.
      LYCHEE_ASSIGN_OR_RETURN(const absl::Status step, Execute(command));
      // A model step's other errors are rank 0's too (the same step on the same pool state), which
      // fails the request there.
      if (absl::IsUnavailable(step)) return step;
      if (!step.ok()) LOG(WARNING) << "tensor-parallel rank " << group_.rank() << ": " << step;
    }
  }

 private:
  // The outer status says whether this rank could follow the command; the inner one is its model
  // step's (OK for the commands that run none).
  absl::StatusOr<absl::Status> Execute(const RankCommand& command) {
    switch (command.op) {
      case RankOp::kStart: LYCHEE_RETURN_IF_ERROR(Start(command)); break;
      case RankOp::kPrefill: {
        LYCHEE_ASSIGN_OR_RETURN(Sequence * sequence, SequenceOf(command.request_ids.at(0)));
        return model_.Prefill(*sequence, command.token_ids).status();
      }
      case RankOp::kDecode: {
        std::vector<Sequence*> sequences;
        for (uint64_t id : command.request_ids) {
          LYCHEE_ASSIGN_OR_RETURN(Sequence * sequence, SequenceOf(id));
          sequences.push_back(sequence);
        }
        const absl::Status decoded = model_.Decode(sequences, command.token_ids, &context_).status();
        // Rank 0 failed the same step and does not combine either.
        if (!decoded.ok() || !command.combine_dropped_mass) return decoded;
        return LargestDroppedMassOverRanks(group_, sequences).status();
      }
      case RankOp::kPreempt: {
        LYCHEE_ASSIGN_OR_RETURN(FollowedRequest * request, Find(command.request_ids.at(0)));
        request->sequence.reset();
        break;
      }
      case RankOp::kRelease: requests_.erase(command.request_ids.at(0)); break;
      case RankOp::kDenseFallback: {
        LYCHEE_ASSIGN_OR_RETURN(FollowedRequest * request, Find(command.request_ids.at(0)));
        request->backend = backends_->dense();
        if (request->sequence != nullptr) request->sequence->SwitchAttention(request->backend);
        break;
      }
      case RankOp::kKeepAlive:
      case RankOp::kShutdown: break;
    }
    return absl::OkStatus();
  }

  absl::Status Start(const RankCommand& command) {
    if (!command.partition.empty()) {
      LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, PartitionFromBytes(command.partition));
      partitions_[command.partition_version] = std::make_shared<const HeadPartition>(std::move(partition));
    }
    const uint64_t id = command.request_ids.at(0);
    auto it = requests_.find(id);
    if (it == requests_.end()) {
      std::shared_ptr<const HeadPartition> partition;
      if (command.partition_version != 0) {
        auto found = partitions_.find(command.partition_version);
        if (found == partitions_.end()) {
          return absl::FailedPreconditionError(
              absl::StrCat("rank command: partition version ", command.partition_version, " never arrived"));
        }
        partition = found->second;
      }
      absl::StatusOr<std::shared_ptr<const AttentionBackend>> backend = backends_->Get(command.policy, partition);
      // Rank 0 made the same backend before it sent this; failing here, this rank cannot follow.
      if (!backend.ok()) return absl::FailedPreconditionError(backend.status().ToString());
      it = requests_.emplace(id, FollowedRequest{*std::move(backend), nullptr}).first;
    }
    it->second.sequence = model_.NewSequence(pool_, it->second.backend);
    return absl::OkStatus();
  }

  absl::StatusOr<FollowedRequest*> Find(uint64_t id) {
    auto it = requests_.find(id);
    if (it == requests_.end()) {
      return absl::FailedPreconditionError(absl::StrCat("rank command: request ", id, " was never started here"));
    }
    return &it->second;
  }

  absl::StatusOr<Sequence*> SequenceOf(uint64_t id) {
    LYCHEE_ASSIGN_OR_RETURN(FollowedRequest * request, Find(id));
    if (request->sequence == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("rank command: request ", id, " holds no sequence here"));
    }
    return request->sequence.get();
  }

  const Model& model_;
  const TensorParallelGroup& group_;
  const std::shared_ptr<KvPool> pool_;
  const std::unique_ptr<ShardBackends> backends_;
  DecodeContext context_;
  std::map<uint64_t, FollowedRequest> requests_;
  std::map<uint64_t, std::shared_ptr<const HeadPartition>> partitions_;
};

}  // namespace

std::string EncodeRankCommand(const RankCommand& command) {
  CommandWriter out;
  out.Put(static_cast<uint8_t>(command.op));
  out.PutVector(command.request_ids);
  out.PutVector(command.token_ids);
  if (command.op == RankOp::kStart) {
    PutPolicy(command.policy, out);
    out.Put(command.partition_version);
    out.PutString(command.partition);
  }
  if (command.op == RankOp::kDecode) out.Put(command.combine_dropped_mass);
  return out.Take();
}

absl::StatusOr<RankCommand> DecodeRankCommand(std::string_view bytes) {
  CommandReader in(bytes);
  RankCommand command;
  LYCHEE_ASSIGN_OR_RETURN(command.op, GetOp(in, RankOp::kStart, RankOp::kShutdown, "rank command"));
  LYCHEE_ASSIGN_OR_RETURN(command.request_ids, in.GetVector<uint64_t>());
  LYCHEE_ASSIGN_OR_RETURN(command.token_ids, in.GetVector<int32_t>());
  if (command.op != RankOp::kKeepAlive && command.op != RankOp::kShutdown && command.request_ids.empty()) {
    return absl::InvalidArgumentError("rank command: no request");
  }
  if (command.op == RankOp::kStart) {
    LYCHEE_ASSIGN_OR_RETURN(command.policy, GetPolicy(in));
    LYCHEE_ASSIGN_OR_RETURN(command.partition_version, in.Get<uint64_t>());
    LYCHEE_ASSIGN_OR_RETURN(command.partition, in.GetString());
  }
  if (command.op == RankOp::kDecode) {
    LYCHEE_ASSIGN_OR_RETURN(command.combine_dropped_mass, in.Get<bool>());
  }
  if (!in.done()) return absl::InvalidArgumentError("rank command: trailing bytes");
  return command;
}

std::string EncodeValidationCommand(const ValidationCommand& command) {
  CommandWriter out;
  out.Put(static_cast<uint8_t>(command.op));
  if (command.op != ValidationOp::kValidate) return out.Take();
  out.PutString(command.partition);
  out.Put(command.token_budget);
  out.Put<uint64_t>(command.tasks.size());
  for (const ValidationSet::Task& task : command.tasks) {
    out.PutString(task.name);
    out.Put(task.longest_prompt_tokens);
    out.Put<uint64_t>(task.samples.size());
    for (const RetrievalSample& sample : task.samples) {
      out.PutVector(sample.prompt_ids);
      out.PutVector(sample.answer_ids);
    }
  }
  return out.Take();
}

absl::StatusOr<ValidationCommand> DecodeValidationCommand(std::string_view bytes) {
  CommandReader in(bytes);
  ValidationCommand command;
  LYCHEE_ASSIGN_OR_RETURN(command.op, GetOp(in, ValidationOp::kValidate, ValidationOp::kStop, "validation command"));
  if (command.op == ValidationOp::kValidate) {
    LYCHEE_ASSIGN_OR_RETURN(command.partition, in.GetString());
    LYCHEE_ASSIGN_OR_RETURN(command.token_budget, in.Get<int64_t>());
    LYCHEE_ASSIGN_OR_RETURN(const uint64_t tasks, in.Get<uint64_t>());
    for (uint64_t t = 0; t < tasks; ++t) {
      ValidationSet::Task task;
      LYCHEE_ASSIGN_OR_RETURN(task.name, in.GetString());
      LYCHEE_ASSIGN_OR_RETURN(task.longest_prompt_tokens, in.Get<int64_t>());
      LYCHEE_ASSIGN_OR_RETURN(const uint64_t samples, in.Get<uint64_t>());
      for (uint64_t i = 0; i < samples; ++i) {
        RetrievalSample sample;
        LYCHEE_ASSIGN_OR_RETURN(sample.prompt_ids, in.GetVector<int32_t>());
        LYCHEE_ASSIGN_OR_RETURN(sample.answer_ids, in.GetVector<int32_t>());
        task.samples.push_back(std::move(sample));
      }
      command.tasks.push_back(std::move(task));
    }
  }
  if (!in.done()) return absl::InvalidArgumentError("validation command: trailing bytes");
  return command;
}

absl::Status BroadcastBytes(const TensorParallelGroup& group, std::string& bytes, absl::string_view what) {
  const bool root = group.rank() == 0;
  return Caught(what, [&] {
    at::Tensor size = at::full({1}, root ? static_cast<int64_t>(bytes.size()) : int64_t{0}, at::kLong);
    group.Broadcast(size, /*root=*/0);
    at::Tensor data = at::empty({size.item<int64_t>()}, at::kByte);
    if (root && !bytes.empty()) std::memcpy(data.data_ptr(), bytes.data(), bytes.size());
    group.Broadcast(data, /*root=*/0);
    if (!root) bytes.assign(static_cast<const char*>(data.data_ptr()), static_cast<size_t>(data.numel()));
    return absl::OkStatus();
  });
}

std::string PartitionBytes(const HeadPartition& partition) {
  return HeadPartitionToProto(partition).SerializeAsString();
}

absl::StatusOr<HeadPartition> PartitionFromBytes(const std::string& bytes) {
  v1::HeadPartition proto;
  if (!proto.ParseFromString(bytes)) return absl::FailedPreconditionError("rank command: unreadable head partition");
  return HeadPartitionFromProto(proto);
}

absl::StatusOr<std::vector<double>> LargestDroppedMassOverRanks(const TensorParallelGroup& group,
                                                                absl::Span<Sequence* const> sequences) {
  const int64_t rows = static_cast<int64_t>(sequences.size());
  std::vector<double> mine(rows, 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    const SequenceAttentionState* state = sequences[row]->attention_state();
    const AttentionTelemetry* telemetry = state == nullptr ? nullptr : state->telemetry();
    if (telemetry != nullptr) mine[row] = telemetry->max_dropped_mass;
  }
  at::Tensor table;
  LYCHEE_RETURN_IF_ERROR(Caught("combining the ranks' dropped attention mass", [&] {
    table = GatherFromRanks(group, at::tensor(mine, at::kDouble));
    return absl::OkStatus();
  }));
  const at::Tensor largest = std::get<0>(table.max(0)).contiguous();
  return std::vector<double>(largest.data_ptr<double>(), largest.data_ptr<double>() + rows);
}

absl::StatusOr<std::unique_ptr<ShardBackends>> ShardBackends::Create(const Model& model) {
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> dense,
                          MakePolicyBackend(PolicySpec::Defaults(PolicyKind::kDense), model.shard_config(), nullptr,
                                            model.options().device));
  return std::unique_ptr<ShardBackends>(new ShardBackends(model, std::move(dense)));
}

absl::StatusOr<std::shared_ptr<const AttentionBackend>> ShardBackends::Get(
    const PolicySpec& spec, const std::shared_ptr<const HeadPartition>& partition) {
  if (spec.kind == PolicyKind::kDense && spec.AuditPeriod() == 0) return dense_;
  const std::pair<std::string, uint64_t> key(spec.Describe(), partition == nullptr ? 0 : partition->version);
  if (auto it = backends_.find(key); it != backends_.end()) return it->second;
  const TensorParallelGroup* group = model_.options().tensor_parallel.get();
  std::shared_ptr<const HeadPartition> shard = partition;
  if (group != nullptr && partition != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition rank_partition,
                            ShardHeadPartition(*partition, group->rank(), group->world_size()));
    shard = std::make_shared<const HeadPartition>(std::move(rank_partition));
  }
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> backend,
                          MakePolicyBackend(spec, model_.shard_config(), shard, model_.options().device));
  // Backends that no request holds any more are dropped, so that a long-running service does not
  // keep one (and its partition) per version or policy parameters it ever served.
  for (auto it = backends_.begin(); it != backends_.end();) {
    it = it->second.use_count() == 1 ? backends_.erase(it) : std::next(it);
  }
  backends_[key] = backend;
  return backend;
}

RankLeader::RankLeader(std::shared_ptr<const TensorParallelGroup> group,
                       std::function<void(const absl::Status&)> on_lost)
    : group_(std::move(group)), on_lost_(std::move(on_lost)) {}

absl::Status RankLeader::Start(uint64_t request_id, const PolicySpec& policy,
                               const std::shared_ptr<const HeadPartition>& partition) {
  RankCommand command{RankOp::kStart, {request_id}};
  command.policy = policy;
  if (partition != nullptr) {
    command.partition_version = partition->version;
    // The first time only: a follower keeps every version it was sent.
    if (partitions_sent_.count(partition->version) == 0) {
      command.partition = PartitionBytes(*partition);
    }
  }
  LYCHEE_RETURN_IF_ERROR(Send(command));
  if (partition != nullptr) partitions_sent_.insert(partition->version);
  return absl::OkStatus();
}

absl::Status RankLeader::Prefill(uint64_t request_id, absl::Span<const int32_t> ids) {
  return Send({RankOp::kPrefill, {request_id}, std::vector<int32_t>(ids.begin(), ids.end())});
}

absl::Status RankLeader::Decode(absl::Span<const uint64_t> request_ids, absl::Span<const int32_t> ids,
                                bool combine_dropped_mass) {
  RankCommand command{RankOp::kDecode, std::vector<uint64_t>(request_ids.begin(), request_ids.end()),
                      std::vector<int32_t>(ids.begin(), ids.end())};
  command.combine_dropped_mass = combine_dropped_mass;
  return Send(command);
}

absl::Status RankLeader::Preempt(uint64_t request_id) { return Send({RankOp::kPreempt, {request_id}}); }
absl::Status RankLeader::Release(uint64_t request_id) { return Send({RankOp::kRelease, {request_id}}); }
absl::Status RankLeader::DenseFallback(uint64_t request_id) { return Send({RankOp::kDenseFallback, {request_id}}); }
absl::Status RankLeader::Shutdown() { return Send({RankOp::kShutdown}); }

absl::Status RankLeader::KeepAlive() {
  if (std::chrono::steady_clock::now() - last_sent_ < group_->timeout() / 4) return status();
  return Send({RankOp::kKeepAlive});
}

absl::Status RankLeader::Send(const RankCommand& command) {
  LYCHEE_RETURN_IF_ERROR(status());
  std::string bytes = EncodeRankCommand(command);
  const absl::Status sent = BroadcastBytes(*group_, bytes, "sending a command to the tensor-parallel ranks");
  last_sent_ = std::chrono::steady_clock::now();
  if (!sent.ok()) Lose(sent);
  return status();
}

void RankLeader::Lose(const absl::Status& cause) {
  absl::Status lost;
  {
    absl::MutexLock lock(&mutex_);
    if (!lost_.ok()) return;
    lost_ = absl::UnavailableError(absl::StrCat("this server lost a tensor-parallel rank of its ", group_->world_size(),
                                                " and cannot decode until it is restarted: ", cause.message()));
    lost = lost_;
  }
  LOG(ERROR) << lost.message();
  if (on_lost_) on_lost_(lost);
}

absl::Status RankLeader::status() const {
  absl::MutexLock lock(&mutex_);
  return lost_;
}

absl::Status RunRankFollower(const EngineOptions& options, const ShadowValidationOptions& shadow) {
  if (options.tensor_parallel == nullptr || options.tensor_parallel->rank() == 0) {
    return absl::InvalidArgumentError("a follower rank needs its tensor-parallel group, as a rank other than 0");
  }
  if (options.threads > 0) at::set_num_threads(options.threads);
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions model_options, ModelOptionsForDevice(options.device));
  model_options.tensor_parallel = options.tensor_parallel;
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(options.model_dir, model_options));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<KvCacheManager> kv,
                          KvCacheManager::Create(*model, options.kv_cache_bytes, options.kv_cache_fraction));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<ShardBackends> backends, ShardBackends::Create(*model));
  // Rank 0's model runner's options: a step that rank 0 replays as a graph is one this rank replays
  // too (graphs capture the collectives with NCCL; with Gloo, steps run eagerly).
  DecodeOptions decode_options;
  decode_options.cuda_graphs = options.cuda_graphs;
  decode_options.max_graph_batch = options.max_batch;
  std::unique_ptr<ShadowValidationFollower> validation;
  if (shadow.tensor_parallel != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(validation, ShadowValidationFollower::Start(shadow, *model));
  }
  Follower follower(*model, kv->pool(), std::move(backends), decode_options);
  return follower.Run();
}

}  // namespace lychee
