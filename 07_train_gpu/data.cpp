// Stage 07's prepared data (data.h): the split by song, the SentencePiece BPE tokenizer, the token files and
// data.json. The songs come from corpus.h.
#include "07_train_gpu/data.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "common/diag.h"
#include "common/errors.h"
#include "common/json_field.h"
#include "common/rng.h"
#include "common/safetensors.h"  // read_file, write_file_atomic

namespace dsv3::data {

namespace {

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += to.size()) s.replace(pos, from.size(), to);
  return s;
}

class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& v) : v_(v) {}
  bool done() const override { return i_ >= v_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return v_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& v_;
  size_t i_ = 0;
};

// Sends stderr to /dev/null while alive: the SentencePiece trainer logs hundreds of lines there, and its
// installed headers offer no switch for that (a failure still comes back as its returned Status).
class QuietStderr {
 public:
  QuietStderr() {
    std::fflush(stderr);
    saved_ = ::dup(2);
    const int devnull = ::open("/dev/null", O_WRONLY);
    if (saved_ >= 0 && devnull >= 0) ::dup2(devnull, 2);
    if (devnull >= 0) ::close(devnull);
  }
  ~QuietStderr() {
    std::fflush(stderr);
    if (saved_ >= 0) {
      ::dup2(saved_, 2);
      ::close(saved_);
    }
  }
  QuietStderr(const QuietStderr&) = delete;
  QuietStderr& operator=(const QuietStderr&) = delete;

 private:
  int saved_ = -1;
};

}  // namespace

// ---- split ----------------------------------------------------------------------------------------------

Split split_by_song(const std::vector<Song>& songs, double val_fraction, uint64_t seed) {
  require(songs.size() >= 2, "need at least 2 songs to split into train and validation, got {}", songs.size());
  require(val_fraction > 0 && val_fraction < 1, "val_fraction must be in (0, 1), got {}", val_fraction);
  std::vector<size_t> order(songs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  Rng rng(seed);
  for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  const size_t n_val = std::clamp<size_t>(size_t(std::llround(val_fraction * double(songs.size()))), 1, songs.size() - 1);
  Split s;
  for (size_t k = 0; k < order.size(); ++k) (k < n_val ? s.val : s.train).push_back(songs[order[k]]);
  return s;
}

// ---- tokenizer ------------------------------------------------------------------------------------------

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::train(const std::vector<std::string>& texts, int vocab_size) {
  require(vocab_size >= 300 && vocab_size <= 65535, "vocab size must be in [300, 65535] (uint16 token files), got {}",
          vocab_size);
  require(!texts.empty(), "tokenizer training needs at least one text");
  std::vector<std::string> sentences;
  size_t longest = 0;
  for (const auto& t : texts) {
    sentences.push_back(replace_all(t, "\n", kNewlineSymbol));
    longest = std::max(longest, sentences.back().size());
  }
  const std::unordered_map<std::string, std::string> kw = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"byte_fallback", "true"},
      {"character_coverage", "1.0"},
      {"user_defined_symbols", kNewlineSymbol},
      {"max_sentence_length", std::to_string(longest + 1)},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"num_threads", "2"},
      {"hard_vocab_limit", "false"},
      {"unk_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"pad_id", "-1"},
  };
  VectorIterator it(sentences);
  Tokenizer tok;
  sentencepiece::util::Status st;
  {
    QuietStderr quiet;
    st = sentencepiece::SentencePieceTrainer::Train(kw, &it, &tok.serialized_);
  }
  require(st.ok(), "SentencePiece training failed: {} (vocab size {} too large for the corpus?)", st.ToString(), vocab_size);
  const auto ls = tok.sp_->LoadFromSerializedProto(tok.serialized_);
  require(ls.ok(), "SentencePiece could not load the model it trained: {}", ls.ToString());
  return tok;
}

Tokenizer Tokenizer::load(const std::string& model_path) {
  Tokenizer tok;
  tok.serialized_ = read_file(model_path, "tokenizer model");
  const auto st = tok.sp_->LoadFromSerializedProto(tok.serialized_);
  require(st.ok(), "tokenizer model '{}' is not a SentencePiece model: {}", model_path, st.ToString());
  require(tok.sp_->PieceToId(kNewlineSymbol) != tok.sp_->unk_id(),
          "tokenizer model '{}' has no newline piece (not made by this stage)", model_path);
  return tok;
}

void Tokenizer::save(const std::string& model_path) const { write_file_atomic(model_path, serialized_); }

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto st = sp_->Encode(replace_all(text, "\n", kNewlineSymbol), &ids);
  require(st.ok(), "tokenizer encode failed: {}", st.ToString());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string text;
  const auto st = sp_->Decode(ids, &text);
  require(st.ok(), "tokenizer decode failed: {}", st.ToString());
  return replace_all(text, kNewlineSymbol, "\n");
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
std::string Tokenizer::piece(int id) const { return sp_->IdToPiece(id); }

// ---- prepared data --------------------------------------------------------------------------------------

void write_tokens(const std::string& path, const std::vector<uint16_t>& tokens) {
  std::string bytes(tokens.size() * 2, '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {  // little-endian whatever the host
    bytes[2 * i] = char(tokens[i] & 0xff);
    bytes[2 * i + 1] = char(tokens[i] >> 8);
  }
  write_file_atomic(path, bytes);
}

std::vector<uint16_t> read_tokens(const std::string& path, int64_t expected_tokens, int vocab_size) {
  require(expected_tokens > 0 && expected_tokens <= int64_t(kMaxFileBytes / 2),
          "token file '{}': data.json's count of {} tokens is out of range", path, expected_tokens);
  const std::string bytes = read_file(path, "token file");
  require(int64_t(bytes.size()) == 2 * expected_tokens,
          "token file '{}' has {} bytes, data.json says {} tokens = {} bytes (truncated or stale file: run prepare again)",
          path, bytes.size(), expected_tokens, 2 * expected_tokens);
  std::vector<uint16_t> t(bytes.size() / 2);
  for (size_t i = 0; i < t.size(); ++i)
    t[i] = uint16_t(static_cast<unsigned char>(bytes[2 * i]) | (static_cast<unsigned char>(bytes[2 * i + 1]) << 8));
  for (size_t i = 0; i < t.size(); ++i)
    require(t[i] < vocab_size, "token file '{}': token {} at position {} is >= vocab_size {}", path, t[i], i, vocab_size);
  return t;
}

namespace {
// A file of the data folder: a name, no path.
bool is_plain_name(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos && name != "." && name != "..";
}

nlohmann::json split_json(const SplitStats& s) {
  return {{"file", s.file}, {"songs", s.songs}, {"lines", s.lines}, {"bytes", s.bytes}, {"tokens", s.tokens}};
}

SplitStats split_from_json(const nlohmann::json& j, const std::string& where) {
  SplitStats s;
  s.file = json_field<std::string>(j, "file", where);
  s.songs = json_field<int64_t>(j, "songs", where);
  s.lines = json_field<int64_t>(j, "lines", where);
  s.bytes = json_field<int64_t>(j, "bytes", where);
  s.tokens = json_field<int64_t>(j, "tokens", where);
  require(s.songs > 0 && s.bytes > 0 && s.tokens >= s.songs && s.lines >= s.songs,
          "{}: inconsistent counts (songs {}, lines {}, bytes {}, tokens {})", where, s.songs, s.lines, s.bytes, s.tokens);
  require(is_plain_name(s.file), "{}: field 'file' must be a plain file name", where);
  return s;
}
}  // namespace

std::string info_to_json(const DataInfo& info) {
  nlohmann::json j;
  j["format_version"] = info.format_version;
  j["token_format"] = "uint16 little-endian token ids, no header; each song is followed by eos_id";
  j["bytes_note"] = "bytes = UTF-8 bytes of the songs' text (eos separators not counted), for bits per byte";
  j["tokenizer"] = info.tokenizer;
  j["tokenizer_type"] = "sentencepiece bpe, byte_fallback, newline = U+E000";
  j["vocab_size"] = info.vocab_size;
  j["eos_id"] = info.eos_id;
  j["seed"] = info.seed;
  j["val_fraction"] = info.val_fraction;
  j["splits"] = {{"train", split_json(info.train)}, {"val", split_json(info.val)}};
  auto& src = j["sources"] = nlohmann::json::array();
  for (const auto& s : info.sources) src.push_back({{"name", s.name}, {"songs", s.songs}, {"bytes", s.bytes}});
  return j.dump(2) + "\n";
}

DataInfo info_from_json(const std::string& text, const std::string& what) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error; out_of_range for a number like 1e400
    throw UserError(fmt::format("{} is not valid JSON: {}", what, e.what()));
  }
  require(j.is_object(), "{}: expected a JSON object", what);
  DataInfo info;
  info.format_version = json_field<int>(j, "format_version", what);
  require(info.format_version == kTokenFormatVersion, "{}: format_version {} is not supported (expected {})", what,
          info.format_version, kTokenFormatVersion);
  info.tokenizer = json_field<std::string>(j, "tokenizer", what);
  require(is_plain_name(info.tokenizer), "{}: field 'tokenizer' must be a plain file name", what);
  info.vocab_size = json_field<int>(j, "vocab_size", what);
  info.eos_id = json_field<int>(j, "eos_id", what);
  info.seed = json_field<uint64_t>(j, "seed", what);
  info.val_fraction = json_field<double>(j, "val_fraction", what);
  require(info.vocab_size > 0 && info.vocab_size <= 65536, "{}: vocab_size {} out of range for uint16 tokens", what,
          info.vocab_size);
  require(info.eos_id >= 0 && info.eos_id < info.vocab_size, "{}: eos_id {} not below vocab_size", what, info.eos_id);
  const auto splits = json_field<nlohmann::json>(j, "splits", what);
  info.train = split_from_json(json_field<nlohmann::json>(splits, "train", what + " splits"), what + " splits.train");
  info.val = split_from_json(json_field<nlohmann::json>(splits, "val", what + " splits"), what + " splits.val");
  const auto sources = json_field<nlohmann::json>(j, "sources", what);
  require(sources.is_array(), "{}: field 'sources' must be an array", what);
  for (const auto& s : sources)
    info.sources.push_back({json_field<std::string>(s, "name", what + " sources"), json_field<int64_t>(s, "songs", what + " sources"),
                            json_field<int64_t>(s, "bytes", what + " sources")});
  return info;
}

namespace {

// data.json against the files: the tokenizer loads and has data.json's vocabulary and eos id; each split is a
// sequence of songs, each ending with eos, as many as data.json counts, whose decoded text has the byte count
// data.json gives (bits per byte divides by it, so a wrong count would silently change every figure).
void check_against_tokenizer(const Prepared& p, const Tokenizer& tok, const std::string& where) {
  require(tok.vocab_size() == p.info.vocab_size && tok.eos_id() == p.info.eos_id, "{}: vocab_size {} and eos_id {} "
          "differ from the tokenizer's ({} and {}): the files do not belong together (run prepare again)", where,
          p.info.vocab_size, p.info.eos_id, tok.vocab_size(), tok.eos_id());
  for (const auto& [split, tokens] : {std::pair{&p.info.train, &p.train}, {&p.info.val, &p.val}}) {
    require(!tokens->empty() && tokens->back() == p.info.eos_id, "{}: the {} tokens do not end with eos_id {}", where,
            split->file, p.info.eos_id);
    int64_t songs = 0, bytes = 0;
    std::vector<int> song;
    for (const uint16_t t : *tokens) {
      if (t != p.info.eos_id) {
        song.push_back(t);
        continue;
      }
      bytes += int64_t(tok.decode(song).size());
      ++songs;
      song.clear();
    }
    require(songs == split->songs && bytes == split->bytes, "{}: {} holds {} songs of {} bytes, data.json says {} "
            "songs of {} bytes (a stale or edited data.json: run prepare again)", where, split->file, songs, bytes,
            split->songs, split->bytes);
  }
}

}  // namespace

Prepared load_prepared(const std::string& dir) {
  const std::string json_path = dir + "/data.json";
  require(std::filesystem::exists(json_path) || std::filesystem::is_symlink(json_path), "no prepared data in {} (no data.json): make it with "
          "`07_train_gpu prepare`, or give the prepared folder with --data", dir);
  Prepared p;
  p.info = info_from_json(read_file(json_path, "prepared data description", kMaxJsonBytes), json_path);
  p.train = read_tokens(dir + "/" + p.info.train.file, p.info.train.tokens, p.info.vocab_size);
  p.val = read_tokens(dir + "/" + p.info.val.file, p.info.val.tokens, p.info.vocab_size);
  check_against_tokenizer(p, Tokenizer::load(dir + "/" + p.info.tokenizer), json_path);
  return p;
}

DataInfo read_data_info(const std::string& dir) {
  const std::string json_path = dir + "/data.json";
  return info_from_json(read_file(json_path, "prepared data description", kMaxJsonBytes), json_path);
}

Prepared prepare_data(const std::vector<Song>& songs, const PrepareOptions& opt, const std::string& dir) {
  for (const auto& s : songs) validate_text(s.text, fmt::format("a song from {}", s.source));
  const Split split = split_by_song(songs, opt.val_fraction, opt.seed);
  std::vector<std::string> train_texts;
  for (const auto& s : split.train) train_texts.push_back(s.text);
  const Tokenizer tok = opt.tokenizer.empty() ? Tokenizer::train(train_texts, opt.vocab_size)
                                              : Tokenizer::load(opt.tokenizer);

  Prepared p;
  DataInfo& info = p.info;
  info.vocab_size = tok.vocab_size();
  info.eos_id = tok.eos_id();
  info.seed = opt.seed;
  info.val_fraction = opt.val_fraction;
  auto encode_split = [&](const std::vector<Song>& part, const std::string& file, SplitStats& st, std::vector<uint16_t>& out) {
    st.file = file;
    for (const auto& s : part) {
      for (int id : tok.encode(s.text)) out.push_back(uint16_t(id));
      out.push_back(uint16_t(info.eos_id));
      st.songs += 1;
      st.lines += count_lines(s.text);
      st.bytes += int64_t(s.text.size());
    }
    st.tokens = int64_t(out.size());
  };
  encode_split(split.train, "train.bin", info.train, p.train);
  encode_split(split.val, "val.bin", info.val, p.val);
  for (const auto& s : songs) {
    auto it = std::find_if(info.sources.begin(), info.sources.end(), [&](const SourceStats& x) { return x.name == s.source; });
    if (it == info.sources.end()) it = info.sources.insert(info.sources.end(), SourceStats{s.source, 0, 0});
    it->songs += 1;
    it->bytes += int64_t(s.text.size());
  }

  ensure_dir(dir);
  tok.save(dir + "/" + info.tokenizer);
  write_tokens(dir + "/" + info.train.file, p.train);
  write_tokens(dir + "/" + info.val.file, p.val);
  write_file_atomic(dir + "/data.json", info_to_json(info));  // last: its presence means the rest is complete
  return p;
}

}  // namespace dsv3::data
