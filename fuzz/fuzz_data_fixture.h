// The prepared data folder fuzz_prepared_data checks its inputs against: stage 07's own prepare_data run on a few
// fixed songs (SentencePiece BPE is deterministic), so its tokenizer.model is the same in every process. The target
// puts that tokenizer next to each input's data.json and token files; make_seeds.cpp takes its data.json and token
// files as the target's seed, which therefore reaches the last check of load_prepared (bytes per song against the
// tokenizer's decode).
#pragma once

#include <fmt/format.h>

#include <string>
#include <vector>

#include "07_train_gpu/data.h"
#include "fuzz/fuzz_support.h"

namespace dsv3::fuzz {

inline const std::string& data_fixture_dir() {
  static const std::string dir = [] {
    const std::string d = scratch().path() + "/data_fixture";
    std::vector<data::Song> songs;
    for (int i = 0; i < 12; ++i)
      songs.push_back({fmt::format("Song {} of the fixture, verse one;\nits second line: la la {}.\nAnd the end.", i,
                                   i * 7), "fuzz"});
    data::PrepareOptions opt;
    opt.vocab_size = 300;
    opt.val_fraction = 0.25;
    opt.seed = 7;
    data::prepare_data(songs, opt, d);
    return d;
  }();
  return dir;
}

}  // namespace dsv3::fuzz
