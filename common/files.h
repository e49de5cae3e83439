// Files: read a whole file, write one atomically, create, rename and remove folders, each failure a UserError
// that names the path. The one home of these helpers (checkpoints, configs, data, diagnostics use them).
#pragma once

#include <cstdint>
#include <string>

namespace dsv3 {

// The largest file read_file reads by default (token files are the largest: 2 bytes a token).
constexpr uint64_t kMaxFileBytes = uint64_t(4) << 30;
// The largest JSON file (config.json, data.json, trainer_state.json) read.
constexpr uint64_t kMaxJsonBytes = uint64_t(16) << 20;
// The whole file as bytes; UserError naming `what` and path when it is missing, a folder, not a regular file (a
// FIFO or a device would block or never end), larger than max_bytes, or unreadable.
std::string read_file(const std::string& path, const std::string& what,
                      uint64_t max_bytes = kMaxFileBytes);
// Writes bytes to path atomically (temporary file, fsync, rename, fsync folder). UserError on failure.
void write_file_atomic(const std::string& path, const std::string& bytes);
// fsync a file or folder so that a rename done in it is durable. Best effort: a path that cannot be opened is
// skipped (the files themselves were fsynced by their writers).
void fsync_path(const std::string& path);
// Renames from to to; UserError naming both when it fails.
void rename_or_throw(const std::string& from, const std::string& to);
// Removes a file or a whole folder (nothing to do when absent); UserError naming path when it fails.
void remove_or_throw(const std::string& path);

// Creates the folder (and parents); UserError when it cannot.
void ensure_dir(const std::string& dir);

}  // namespace dsv3
