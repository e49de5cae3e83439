// Stage 06 checkpoints: a directory with config.json and model.safetensors, tensor names as Hugging Face's
// DeepseekV3 (so transformers loads it), MTP modules at layer index num_hidden_layers + k as DeepSeek's
// release stores them (enorm, hnorm, eh_proj, the block, and shared_head / embed_tokens copies of the
// shared tensors). Writes are atomic; loading validates names, dtypes and shapes before using any data.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "06_full_model/model_config.h"
#include "common/safetensors.h"

namespace dsv3 {

struct TensorSpec {
  std::string name;            // Hugging Face name, e.g. model.layers.3.mlp.experts.17.gate_proj.weight
  std::vector<int64_t> shape;  // PyTorch layout
  std::string mirror_of;       // non-empty: a copy of that tensor (the release's MTP shared_head / embed_tokens)
  int64_t numel() const;
};

// Every tensor of the model described by c, from the model's one list (model.h: embedding, layers, norm, head,
// MTP modules; one tensor per routed expert), then the release's copies of the shared tensors per MTP module.
std::vector<TensorSpec> checkpoint_specs(const ModelConfig& c);

// Tensors by Hugging Face name, fp32 on the host.
using TensorMap = std::map<std::string, std::vector<float>>;

// Writes dir/config.json and dir/model.safetensors (each atomically; dir is created). Every non-mirror spec
// must be present in `tensors` with the right size (UserError naming the tensor otherwise); mirrors are
// written from their source. stored: DType::F32 or DType::BF16.
void save_checkpoint(const std::string& dir, const ModelConfig& c, const TensorMap& tensors,
                     DType stored = DType::F32);

struct Checkpoint {
  ModelConfig config;
  TensorMap tensors;  // every non-mirror spec, as fp32
};
// Reads dir/config.json and dir/model.safetensors; UserError naming the problem when a tensor is missing,
// unexpected, of the wrong shape or dtype, or a mirror differs from its source.
Checkpoint load_checkpoint(const std::string& dir);

}  // namespace dsv3
