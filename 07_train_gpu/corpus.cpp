// Stage 07's lyrics corpus (corpus.h): the fortune file cleaning rules, the Bible parser, the Debian sources and
// user lyrics files, each turned into songs of plain text.
#include "07_train_gpu/corpus.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <regex>

#include "07_train_gpu/data.h"  // kNewlineSymbol, kSpaceMeta: the characters a song must not contain
#include "common/errors.h"
#include "common/safetensors.h"  // read_file

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
    std::string text = join_stanzas(lines);  // "" for a song of blank lines only (e.g. "%" twice): skipped
    if (!text.empty()) songs.push_back({std::move(text), path});
    lines.clear();
  };
  for (auto line : split_lines(bytes)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
    if (line == "%") flush();                        // the end of a song
    else lines.push_back(is_blank(line) ? "" : line);  // blank: a stanza break (join_stanzas keeps one)
  }
  flush();
  require(!songs.empty(), "{} holds no songs", what);
  return songs;
}

// ---- text helpers ---------------------------------------------------------------------------------------

int64_t count_lines(const std::string& text) {
  int64_t n = 0;
  for (const auto& l : split_lines(text)) n += !l.empty();
  return n;
}

}  // namespace dsv3::data
