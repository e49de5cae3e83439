#include "common/diag.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "common/device.h"
#include "common/errors.h"

namespace dsv3 {

void Table::add_row(std::vector<std::string> cells) {
  cells.resize(headers_.size());
  rows_.push_back(std::move(cells));
}

static bool looks_numeric(const std::string& s) {
  if (s.empty()) return false;
  char* end = nullptr;
  std::strtod(s.c_str(), &end);
  return end && *end == '\0';
}

std::string Table::str() const {
  std::vector<size_t> w(headers_.size());
  for (size_t c = 0; c < headers_.size(); ++c) {
    w[c] = headers_[c].size();
    for (const auto& r : rows_) w[c] = std::max(w[c], r[c].size());
  }
  auto line = [&](const std::vector<std::string>& cells, bool header) {
    std::string s;
    for (size_t c = 0; c < cells.size(); ++c) {
      const bool right = !header && looks_numeric(cells[c]);
      s += right ? fmt::format("{:>{}}", cells[c], w[c]) : fmt::format("{:<{}}", cells[c], w[c]);
      s += c + 1 < cells.size() ? "  " : "";
    }
    return s + "\n";
  };
  std::string out = line(headers_, true);
  size_t total = 0;
  for (auto x : w) total += x + 2;
  out += std::string(total > 2 ? total - 2 : 0, '-') + "\n";
  for (const auto& r : rows_) out += line(r, false);
  return out;
}

void Table::print() const { std::cout << str() << std::flush; }

CsvWriter::CsvWriter(const std::string& path, const std::vector<std::string>& headers)
    : path_(path), ncols_(headers.size()), f_(path) {
  require(f_.good(), "cannot write '{}': check that the folder exists and is writable", path);
  row_cells(headers);
}

void CsvWriter::row(const std::vector<double>& values) {
  std::vector<std::string> cells;
  cells.reserve(values.size());
  for (double v : values) cells.push_back(fmt::format("{:.9g}", v));
  row_cells(cells);
}

void CsvWriter::row_cells(const std::vector<std::string>& cells) {
  require(cells.size() == ncols_, "CSV '{}': row has {} cells, header has {}", path_, cells.size(), ncols_);
  for (size_t i = 0; i < cells.size(); ++i) f_ << (i ? "," : "") << cells[i];
  f_ << "\n";
  require(f_.good(), "writing '{}' failed (disk full?)", path_);
}

int print_cpu_cuda_table(const std::vector<CpuCudaRow>& rows) {
  Table t({"op", "shape", "max abs err", "max rel err", "cpu ms", "cuda ms"});
  int failures = 0;
  for (const auto& r : rows) {
    const bool have = !std::isnan(r.gpu_ms);
    t.add_row({r.op, r.shape, have ? fmt_num(r.err.max_abs) : "-", have ? fmt_num(r.err.max_rel) : "-",
               fmt_num(r.cpu_ms), have ? fmt_num(r.gpu_ms) : "-"});
    if (have && !r.err.ok()) {
      std::cout << r.err.report(r.op) << "\n";
      ++failures;
    }
  }
  t.print();
  if (!gpu_available()) std::cout << "CUDA columns empty: " << gpu_description() << "\n";
  return failures;
}

static bool have_gnuplot() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

bool render_plots(const std::string& script, const std::string& out_dir) {
  const std::string cmd = fmt::format("gnuplot -e \"outdir='{}'\" '{}'", out_dir, script);
  if (!have_gnuplot()) {
    std::cout << fmt::format("gnuplot not found: the CSV files are in {}; render the plots later with\n  {}\n",
                             out_dir, cmd);
    return false;
  }
  if (std::system((cmd + " 2>&1").c_str()) != 0) {
    std::cout << fmt::format("gnuplot failed on {}; the CSV files are in {}\n", script, out_dir);
    return false;
  }
  std::cout << fmt::format("plots written to {}\n", out_dir);
  return true;
}

std::string fmt_num(double x, int digits) {
  const double a = std::abs(x);
  if (x == 0.0) return "0";
  if (a >= 1e-3 && a < 1e6) return fmt::format("{:.{}g}", x, digits + 1);
  return fmt::format("{:.{}e}", x, digits - 1);
}

}  // namespace dsv3
