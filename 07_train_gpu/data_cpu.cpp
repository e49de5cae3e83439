// Stage 07 data preparation: corpus cleaning, split, SentencePiece BPE, token files. See data.h.
#include "07_train_gpu/data.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <unordered_map>

#include "common/diag.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/safetensors.h"  // write_file_atomic

namespace dsv3::data {

namespace {

namespace fs = std::filesystem;

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::string cur;
  for (char c : text) {
    if (c == '\n') {
      lines.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) lines.push_back(cur);
  return lines;
}

bool is_blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

// Whitespace runs -> one space, trimmed.
std::string squeeze(const std::string& s) {
  std::string out;
  bool space = false;
  for (unsigned char c : s) {
    if (std::isspace(c)) {
      space = true;
    } else {
      if (space && !out.empty()) out += ' ';
      space = false;
      out += char(c);
    }
  }
  return out;
}

// Removes overstrike pairs "c\b" and control characters other than tab.
std::string strip_controls(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\b') {
      if (!out.empty()) out.pop_back();
    } else if (static_cast<unsigned char>(c) >= 0x20 || c == '\t') {
      if (c != 0x7f) out += c;
    }
  }
  return out;
}

// Joins non-empty lines with '\n', keeping single blank lines between stanzas.
std::string join_stanzas(const std::vector<std::string>& lines) {
  std::string out;
  bool pending_blank = false;
  for (const auto& l : lines) {
    if (l.empty()) {
      pending_blank = !out.empty();
      continue;
    }
    if (!out.empty()) out += pending_blank ? "\n\n" : "\n";
    pending_blank = false;
    out += l;
  }
  return out;
}

// A title: a line in capitals (at least 2 letters, no lower case, at most 60 characters).
bool is_capitals(const std::string& line) {
  if (line.size() > 60) return false;
  int letters = 0;
  for (unsigned char c : line) {
    if (std::islower(c)) return false;
    letters += std::isupper(c) != 0;
  }
  return letters >= 2;
}

const std::regex& numbering_line() {
  static const std::regex re(R"(^(#?\d+[.):]?|[IVXLC]+[.):]|[IVXLC]{2,}|\(\d+\)))");
  return re;
}
const std::regex& leading_number() {
  static const std::regex re(R"(^\d+[.)]\s+)");
  return re;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Length of the UTF-8 sequence starting at s[i], or 0 when it is invalid (overlong, surrogate, > U+10FFFF).
size_t utf8_len(const std::string& s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) n = 2, cp = c & 0x1F;
  else if ((c & 0xF0) == 0xE0) n = 3, cp = c & 0x0F;
  else if ((c & 0xF8) == 0xF0) n = 4, cp = c & 0x07;
  else return 0;
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  const uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

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

// ---- cleaning -------------------------------------------------------------------------------------------

namespace {

// Display column of each byte with 8-column tab stops.
std::vector<int> display_columns(const std::string& s) {
  std::vector<int> col(s.size() + 1);
  int c = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    col[i] = c;
    c = s[i] == '\t' ? (c / 8 + 1) * 8 : c + 1;
  }
  col[s.size()] = c;
  return col;
}

// Position of the second column in a line: the text after the first gap (whitespace holding a tab, or 4+
// spaces) that follows text. npos when the line has no gap.
size_t column_gap_end(const std::string& s) {
  const size_t start = s.find_first_not_of(" \t");
  if (start == std::string::npos) return std::string::npos;
  for (size_t i = start; i < s.size(); ++i) {
    if (s[i] != ' ' && s[i] != '\t') continue;
    size_t j = i;
    while (j < s.size() && (s[j] == ' ' || s[j] == '\t')) ++j;
    const bool gap = s.find('\t', i) < j || j - i >= 4;
    if (gap && j < s.size()) return j;
    i = j;
  }
  return std::string::npos;
}

}  // namespace

// An entry laid out in two columns (2+ lines with a column gap) is unfolded: the left column, a blank line,
// then the right column. Lines without a gap that start at or right of the second column belong to it;
// attribution lines ("--") and their indented continuation stay where they are (they are dropped later).
std::string unfold_columns(const std::string& entry) {
  std::vector<std::string> lines;
  for (const auto& l : split_lines(entry)) lines.push_back(strip_controls(l));
  int split_lines_n = 0, right_col = 1 << 30;
  for (const auto& l : lines) {
    const size_t g = column_gap_end(l);
    if (g == std::string::npos || squeeze(l).rfind("--", 0) == 0) continue;
    ++split_lines_n;
    right_col = std::min(right_col, display_columns(l)[g]);
  }
  if (split_lines_n < 2) return entry;
  std::string left, right;
  bool in_attribution = false;
  for (const auto& l : lines) {
    const size_t start = l.find_first_not_of(" \t");
    if (start == std::string::npos) {
      left += "\n";
      right += "\n";
      continue;
    }
    const bool attribution = squeeze(l).rfind("--", 0) == 0;
    in_attribution = attribution || (in_attribution && start > 0);
    const size_t g = column_gap_end(l);
    if (in_attribution) {
      left += l + "\n";
    } else if (g != std::string::npos) {
      left += l.substr(0, g) + "\n";
      right += l.substr(g) + "\n";
    } else if (display_columns(l)[start] >= right_col - 1) {
      right += l.substr(start) + "\n";
    } else {
      left += l + "\n";
    }
  }
  return left + "\n" + right;
}

std::string clean_fortune_entry(const std::string& entry) {
  struct Line {
    std::string text;
    bool indented;
  };
  std::vector<Line> lines;
  for (const auto& raw0 : split_lines(unfold_columns(entry))) {
    const std::string raw = strip_controls(raw0);
    lines.push_back({squeeze(raw), !raw.empty() && (raw[0] == ' ' || raw[0] == '\t')});
  }
  std::vector<std::string> kept;
  bool in_attribution = false;
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string& line = lines[i].text;
    if (line.rfind("--", 0) == 0) {  // attribution: "-- Author" (any indentation)
      in_attribution = true;
      continue;
    }
    if (in_attribution && lines[i].indented && !line.empty()) continue;  // the attribution's continuation lines
    in_attribution = false;
    if (lines[i].indented && line.rfind('[', 0) == 0) {  // an indented editorial note "[... Ed.]", maybe multi-line
      while (i + 1 < lines.size() && (lines[i].text.empty() || lines[i].text.back() != ']')) ++i;
      continue;
    }
    if (line.size() >= 2 && line.front() == '[' && line.back() == ']' && line.find(']') == line.size() - 1) continue;  // "[chorus]", "[...]"
    if (std::regex_match(line, numbering_line())) continue;
    const bool first = std::none_of(kept.begin(), kept.end(), [](const std::string& l) { return !l.empty(); });
    const bool blank_next = i + 1 >= lines.size() || lines[i + 1].text.empty();
    if (first && is_capitals(line) && blank_next) continue;  // a title line, set off by a blank line
    kept.push_back(std::regex_replace(line, leading_number(), ""));
  }
  const std::string text = join_stanzas(kept);
  int64_t n_text_lines = 0;
  for (const auto& l : split_lines(text)) n_text_lines += !l.empty();
  return n_text_lines >= 2 ? text : std::string();
}

std::vector<std::string> clean_fortune_file(const std::string& contents) {
  std::vector<std::string> songs;
  std::string entry;
  auto flush = [&] {
    std::string s = clean_fortune_entry(entry);
    if (!s.empty()) songs.push_back(std::move(s));
    entry.clear();
  };
  for (const auto& line : split_lines(contents)) {
    if (line == "%" || line == "%\r") flush();
    else entry += line + "\n";
  }
  flush();
  return songs;
}

std::vector<Song> parse_bible_output(const std::string& output) {
  static const std::regex chapter(R"(^(Psalms|Song of Solomon) (\d+)\s*$)");
  static const std::regex verse(R"(^\s*(\d+)\s+(.*)$)");
  std::vector<Song> songs;
  std::vector<std::string> verses;
  std::string source;
  auto flush = [&] {
    if (!verses.empty()) songs.push_back({join_stanzas(verses), source});
    verses.clear();
  };
  std::smatch m;
  for (const auto& raw : split_lines(output)) {
    const std::string line = squeeze(raw);
    if (line.empty()) continue;
    if (std::regex_match(line, m, chapter)) {
      flush();
      source = m[1] == "Psalms" ? "bible-kjv/psalms" : "bible-kjv/song-of-solomon";
    } else if (source.empty()) {
      continue;  // banner lines before the first chapter
    } else if (std::regex_match(raw, m, verse)) {
      verses.push_back(squeeze(m[2]));
    } else if (!verses.empty()) {
      verses.back() += " " + line;  // a wrapped verse
    }
  }
  flush();
  return songs;
}

// ---- sources ---------------------------------------------------------------------------------------------

std::string read_file(const std::string& path, const std::string& what) {
  require(fs::exists(path), "{} '{}' does not exist", what, path);
  require(!fs::is_directory(path), "{} '{}' is a directory, not a file", what, path);
  std::ifstream f(path, std::ios::binary);
  require(f.good(), "{} '{}' cannot be read (permissions?)", what, path);
  std::ostringstream ss;
  ss << f.rdbuf();
  require(!f.bad(), "{} '{}': read error", what, path);
  return ss.str();
}

std::string run_bible(const std::string& bible_cmd) {
  // "-l100000": one line per verse (no wrapping). References as arguments: no interactive prompt.
  std::string cmd = shell_quote(bible_cmd) + " -l100000";
  for (int c = 1; c <= 150; ++c) cmd += fmt::format(" Ps{}:1-999", c);
  for (int c = 1; c <= 8; ++c) cmd += fmt::format(" Song{}:1-999", c);
  cmd += " </dev/null 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  require(p != nullptr, "cannot run '{}' (install the Debian package bible-kjv: scripts/setup.sh)", bible_cmd);
  std::string out;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int rc = pclose(p);
  require(rc == 0 && !out.empty(),
          "'{}' failed (exit status {}); install the Debian package bible-kjv (scripts/setup.sh)", bible_cmd, rc);
  return out;
}

bool default_sources_available(const CorpusPaths& paths) {
  if (!fs::exists(paths.fortunes)) return false;
  const std::string probe = "command -v " + shell_quote(paths.bible) + " >/dev/null 2>&1";
  return std::system(probe.c_str()) == 0;
}

std::vector<Song> load_default_corpus(const CorpusPaths& paths) {
  require(fs::exists(paths.fortunes), "corpus source '{}' is missing: install the Debian package fortunes (scripts/setup.sh)",
          paths.fortunes);
  std::vector<Song> songs;
  for (auto& s : clean_fortune_file(read_file(paths.fortunes, "fortune file"))) songs.push_back({std::move(s), "fortunes/songs-poems"});
  const auto bible = parse_bible_output(run_bible(paths.bible));
  require(bible.size() == 158, "'{}' gave {} chapters, expected 150 psalms + 8 of the Song of Solomon", paths.bible,
          bible.size());
  songs.insert(songs.end(), bible.begin(), bible.end());
  return songs;
}

void validate_text(const std::string& bytes, const std::string& what) {
  require(!is_blank(bytes), "{} is empty (no text)", what);
  const size_t nul = bytes.find('\0');
  require(nul == std::string::npos, "{} is binary: NUL byte at offset {}", what, nul);
  for (size_t i = 0; i < bytes.size();) {
    const size_t n = utf8_len(bytes, i);
    require(n > 0, "{} is not UTF-8 text: invalid byte 0x{:02x} at offset {}", what, static_cast<unsigned char>(bytes[i]), i);
    i += n;
  }
  require(bytes.find(kNewlineSymbol) == std::string::npos && bytes.find(kSpaceMeta) == std::string::npos,
          "{} contains a character reserved by the tokenizer (U+E000 or U+2581)", what);
}

std::vector<Song> read_lyrics_file(const std::string& path) {
  const std::string what = fmt::format("lyrics file '{}'", path);
  const std::string bytes = read_file(path, "lyrics file");
  validate_text(bytes, what);
  std::vector<Song> songs;
  std::vector<std::string> lines;
  auto flush = [&] {
    if (!lines.empty()) songs.push_back({join_stanzas(lines), path});
    lines.clear();
  };
  for (auto line : split_lines(bytes)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
    if (is_blank(line)) flush();
    else lines.push_back(line);
  }
  flush();
  require(!songs.empty(), "{} holds no songs", what);
  return songs;
}

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

int64_t count_lines(const std::string& text) {
  int64_t n = 0;
  for (const auto& l : split_lines(text)) n += !l.empty();
  return n;
}

void write_tokens(const std::string& path, const std::vector<uint16_t>& tokens) {
  std::string bytes(tokens.size() * 2, '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {  // little-endian whatever the host
    bytes[2 * i] = char(tokens[i] & 0xff);
    bytes[2 * i + 1] = char(tokens[i] >> 8);
  }
  write_file_atomic(path, bytes);
}

std::vector<uint16_t> read_tokens(const std::string& path, int64_t expected_tokens, int vocab_size) {
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
nlohmann::json split_json(const SplitStats& s) {
  return {{"file", s.file}, {"songs", s.songs}, {"lines", s.lines}, {"bytes", s.bytes}, {"tokens", s.tokens}};
}

template <typename T>
T get_field(const nlohmann::json& j, const std::string& key, const std::string& where) {
  require(j.is_object() && j.contains(key), "{}: missing field '{}'", where, key);
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw UserError(fmt::format("{}: field '{}' has the wrong type ({})", where, key, j.at(key).type_name()));
  }
}

SplitStats split_from_json(const nlohmann::json& j, const std::string& where) {
  SplitStats s;
  s.file = get_field<std::string>(j, "file", where);
  s.songs = get_field<int64_t>(j, "songs", where);
  s.lines = get_field<int64_t>(j, "lines", where);
  s.bytes = get_field<int64_t>(j, "bytes", where);
  s.tokens = get_field<int64_t>(j, "tokens", where);
  require(s.songs > 0 && s.bytes > 0 && s.tokens >= s.songs && s.lines >= s.songs,
          "{}: inconsistent counts (songs {}, lines {}, bytes {}, tokens {})", where, s.songs, s.lines, s.bytes, s.tokens);
  require(!s.file.empty() && s.file.find('/') == std::string::npos, "{}: field 'file' must be a plain file name", where);
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
  } catch (const nlohmann::json::parse_error& e) {
    throw UserError(fmt::format("{} is not valid JSON: {}", what, e.what()));
  }
  require(j.is_object(), "{}: expected a JSON object", what);
  DataInfo info;
  info.format_version = get_field<int>(j, "format_version", what);
  require(info.format_version == kTokenFormatVersion, "{}: format_version {} is not supported (expected {})", what,
          info.format_version, kTokenFormatVersion);
  info.tokenizer = get_field<std::string>(j, "tokenizer", what);
  info.vocab_size = get_field<int>(j, "vocab_size", what);
  info.eos_id = get_field<int>(j, "eos_id", what);
  info.seed = get_field<uint64_t>(j, "seed", what);
  info.val_fraction = get_field<double>(j, "val_fraction", what);
  require(info.vocab_size > 0 && info.vocab_size <= 65536, "{}: vocab_size {} out of range for uint16 tokens", what,
          info.vocab_size);
  require(info.eos_id >= 0 && info.eos_id < info.vocab_size, "{}: eos_id {} not below vocab_size", what, info.eos_id);
  const auto splits = get_field<nlohmann::json>(j, "splits", what);
  info.train = split_from_json(get_field<nlohmann::json>(splits, "train", what + " splits"), what + " splits.train");
  info.val = split_from_json(get_field<nlohmann::json>(splits, "val", what + " splits"), what + " splits.val");
  const auto sources = get_field<nlohmann::json>(j, "sources", what);
  require(sources.is_array(), "{}: field 'sources' must be an array", what);
  for (const auto& s : sources)
    info.sources.push_back({get_field<std::string>(s, "name", what + " sources"), get_field<int64_t>(s, "songs", what + " sources"),
                            get_field<int64_t>(s, "bytes", what + " sources")});
  return info;
}

Prepared load_prepared(const std::string& dir) {
  const std::string json_path = dir + "/data.json";
  Prepared p;
  p.info = info_from_json(read_file(json_path, "prepared data description"), json_path);
  p.train = read_tokens(dir + "/" + p.info.train.file, p.info.train.tokens, p.info.vocab_size);
  p.val = read_tokens(dir + "/" + p.info.val.file, p.info.val.tokens, p.info.vocab_size);
  return p;
}

Prepared prepare_data(const std::vector<Song>& songs, const PrepareOptions& opt, const std::string& dir) {
  for (const auto& s : songs) validate_text(s.text, fmt::format("a song from {}", s.source));
  const Split split = split_by_song(songs, opt.val_fraction, opt.seed);
  std::vector<std::string> train_texts;
  for (const auto& s : split.train) train_texts.push_back(s.text);
  const Tokenizer tok = Tokenizer::train(train_texts, opt.vocab_size);

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
