// Stage 07's prepared data: songs (corpus.h) -> token files a trainer reads.
//
// Pipeline (prepare mode of the 07_train_gpu executable):
//   songs (corpus.h)
//     -> split into train / validation BY SONG with a seeded shuffle
//     -> SentencePiece BPE trained on the train split only
//     -> <dir>/train.bin, <dir>/val.bin, <dir>/tokenizer.model, <dir>/data.json
//
// Token file format (kTokenFormatVersion 1): a flat array of uint16 little-endian token ids, no header.
// Every song is encoded on its own and followed by the tokenizer's eos id, so a song boundary is one token.
// The size of a file is exactly 2 * tokens bytes; data.json records the counts and load_prepared() checks them.
// Text bytes per split (for bits per byte) = the UTF-8 bytes of the songs' texts; the eos separators are
// not counted as bytes (every tokenizer pays the same one token per song, so comparisons stay fair).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "07_train_gpu/corpus.h"
#include "common/safetensors.h"  // read_file

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace dsv3::data {

constexpr int kTokenFormatVersion = 1;
// The tokenizer sees "\n" as this private-use character (one user-defined piece), so newlines survive
// SentencePiece's whitespace handling and are always a token of their own. Input must not contain it.
constexpr const char* kNewlineSymbol = "\xEE\x80\x80";  // U+E000
// SentencePiece's meta symbol for a space (U+2581); input must not contain it either (it would decode as a space).
constexpr const char* kSpaceMeta = "\xE2\x96\x81";

// ---- split ----------------------------------------------------------------------------------------------
struct Split {
  std::vector<Song> train, val;
};
// Fisher-Yates shuffle of the song order with dsv3::Rng(seed), then the first round(val_fraction * n)
// songs (at least 1) are validation. Deterministic for a seed; a song is never in both splits.
Split split_by_song(const std::vector<Song>& songs, double val_fraction, uint64_t seed);

// ---- tokenizer ------------------------------------------------------------------------------------------
class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // SentencePiece BPE on these texts: identity normalization, no dummy prefix, extra whitespace kept,
  // byte_fallback, character_coverage 1.0, kNewlineSymbol as a user-defined symbol; unk 0, bos 1, eos 2.
  static Tokenizer train(const std::vector<std::string>& texts, int vocab_size);  // deterministic (BPE, no sampling)
  static Tokenizer load(const std::string& model_path);  // UserError when the file is missing or bad
  void save(const std::string& model_path) const;        // atomic (write_file_atomic: temp file, fsync, rename)

  std::vector<int> encode(const std::string& text) const;  // '\n' -> kNewlineSymbol before encoding
  std::string decode(const std::vector<int>& ids) const;   // and back after decoding
  int vocab_size() const;
  int eos_id() const;
  std::string piece(int id) const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string serialized_;
};

// ---- prepared data --------------------------------------------------------------------------------------
struct SplitStats {
  std::string file;        // "train.bin" / "val.bin", relative to the data folder
  int64_t songs = 0, lines = 0, bytes = 0, tokens = 0;  // tokens include one eos per song
};
struct SourceStats {
  std::string name;
  int64_t songs = 0, bytes = 0;
};
struct DataInfo {
  int format_version = kTokenFormatVersion;
  int vocab_size = 0, eos_id = 0;
  uint64_t seed = 0;
  double val_fraction = 0;
  std::string tokenizer = "tokenizer.model";
  SplitStats train, val;
  std::vector<SourceStats> sources;
};
struct Prepared {
  DataInfo info;
  std::vector<uint16_t> train, val;
};
// <dir>/data.json alone, with load_prepared's checks of its fields (not of the files it names).
DataInfo read_data_info(const std::string& dir);

struct PrepareOptions {
  int vocab_size = 4096;  // asked for: a small corpus may give fewer pieces (the tokenizer stops when no pair is left)
  double val_fraction = 0.1;
  uint64_t seed = 1234;
  std::string tokenizer;  // a tokenizer.model to reuse instead of training one (fine-tuning a model trained with it)
};
// Splits, trains the tokenizer on the train split (or loads opt.tokenizer), encodes both splits and writes the
// four files into dir (created if needed). Returns what it wrote (tokens included).
Prepared prepare_data(const std::vector<Song>& songs, const PrepareOptions& opt, const std::string& dir);

// Token files: uint16 little-endian. write_tokens is atomic; read_tokens checks the size against `expected`.
void write_tokens(const std::string& path, const std::vector<uint16_t>& tokens);
std::vector<uint16_t> read_tokens(const std::string& path, int64_t expected_tokens, int vocab_size);

std::string info_to_json(const DataInfo& info);
DataInfo info_from_json(const std::string& text, const std::string& what);  // UserError naming the field
// Reads data.json, validates it, reads and checks both token files (size, ids < vocab_size).
Prepared load_prepared(const std::string& dir);

// The whole file; UserError when unreadable (common's reader, also reachable as data::read_file).
using dsv3::read_file;

}  // namespace dsv3::data
