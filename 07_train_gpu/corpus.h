// Stage 07's lyrics corpus: the songs a model learns from, as plain text.
//
//   songs-poems (Debian package fortunes) + Psalms, Song of Solomon (Debian package bible-kjv) [+ user lyrics files]
//     -> cleaned songs, one per block (Song::text: lines joined by '\n', no leading/trailing newline)
//
// data.h takes the songs on: split by song, tokenizer, token files. Every song must be valid tokenizer input
// (validate_text below: UTF-8, no NUL, none of the tokenizer's reserved characters).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::data {

struct Song {
  std::string text;    // lines joined by '\n'; no leading/trailing blank line
  std::string source;  // "fortunes/songs-poems", "bible-kjv/psalms", "bible-kjv/song-of-solomon", or a file path
};

// ---- cleaning -------------------------------------------------------------------------------------------
// The fortune file format: entries separated by lines holding a single '%'. Rules (README "Cleaning"):
//   overstrike sequences "c\b" are removed, other control characters (but tab) dropped;
//   an entry laid out in two columns (2+ lines with a gap of tabs or 4+ spaces inside the text) is unfolded:
//   the left column, a blank line, then the right column (unfold_columns);
//   an attribution line (trimmed text starts with "--") is dropped with the indented lines that continue it;
//   an indented editorial note "[... Ed.]" (possibly over several lines) and a line that is one bracketed
//   marker ("[chorus]", "[...]") are dropped;
//   numbering lines ("3.", "IV", "#53", "(2)") are dropped, a leading "3. " / "3) " numbering is removed;
//   a title (the first line of an entry, in capitals, at most 60 characters, followed by a blank line) is dropped;
//   whitespace runs inside a line become one space, lines are trimmed, blank-line runs become one blank
//   line, leading/trailing blank lines removed; entries with fewer than 2 lines of text are dropped.
std::vector<std::string> clean_fortune_file(const std::string& contents);
// One fortune entry (the text between two '%' lines) -> cleaned song text ("" when it is dropped).
std::string clean_fortune_entry(const std::string& entry);
std::string unfold_columns(const std::string& entry);

// Parses the output of `bible -l<wide> <refs>`: a line "Psalms 23" / "Song of Solomon 2" starts a chapter,
// "  4 Yea, though I walk ..." is a verse (its number is stripped), other non-blank lines continue the verse.
// Returns one text per chapter (one verse per line), tagged with its book's source name.
std::vector<Song> parse_bible_output(const std::string& output);

// ---- sources ---------------------------------------------------------------------------------------------
struct CorpusPaths {
  std::string fortunes = "/usr/share/games/fortunes/songs-poems";
  std::string bible = "bible";  // the bible-kjv command (looked up on PATH)
};
bool default_sources_available(const CorpusPaths& paths = {});
// The default corpus: every cleaned songs-poems entry, Psalms 1-150 and Song of Solomon 1-8.
// UserError (naming the Debian package and scripts/setup.sh) when a source is missing.
std::vector<Song> load_default_corpus(const CorpusPaths& paths = {});
// Runs `bible` non-interactively for the Psalms and the Song of Solomon and returns its raw output.
std::string run_bible(const std::string& bible_cmd);

// A user's lyrics file, the layout of the fortune files the default corpus comes from: UTF-8 text, songs
// separated by a line holding only '%', a blank line inside a song is a stanza break (runs of blank lines become
// one; leading/trailing ones are dropped), trailing spaces and "\r\n" line ends are accepted. A file without a
// '%' line is one song.
// UserError for a missing/unreadable file, an empty one, NUL bytes, invalid UTF-8 or reserved characters.
std::vector<Song> read_lyrics_file(const std::string& path);
// The text checks of read_lyrics_file on bytes already read; `what` names the input in the message. The reserved
// characters are the tokenizer's (data.h: kNewlineSymbol, kSpaceMeta).
void validate_text(const std::string& bytes, const std::string& what);

// ---- text helpers ---------------------------------------------------------------------------------------
int64_t count_lines(const std::string& text);  // the non-empty lines of a text

}  // namespace dsv3::data
