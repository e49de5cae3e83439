// Diagnostics every demo writes: a fixed-width table on stdout, CSV files, and PNG plots rendered by
// gnuplot (pngcairo) from the stage's plots.gp. Without gnuplot the CSVs are still written and the demo
// says how to render them later.
#pragma once

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "common/compare.h"
#include "common/files.h"

namespace dsv3 {

// Fixed-width text table. Columns are as wide as their widest cell; numbers right-aligned.
class Table {
 public:
  explicit Table(std::vector<std::string> headers) : headers_(std::move(headers)) {}
  void add_row(std::vector<std::string> cells);
  std::string str() const;
  void print() const;

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
};

// Writes a CSV file with a header line; numbers with 9 significant digits.
class CsvWriter {
 public:
  CsvWriter(const std::string& path, const std::vector<std::string>& headers);
  void row(const std::vector<double>& values);
  void row_cells(const std::vector<std::string>& cells);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  size_t ncols_;
  std::ofstream f_;
};

// One line of a demo's "CPU reference vs CUDA" table: the op, its shape, the comparison of the CUDA result
// with the CPU's, and median times (NaN when not measured, e.g. no GPU).
struct CpuCudaRow {
  CpuCudaRow(std::string o, std::string s) : op(std::move(o)), shape(std::move(s)) {}
  std::string op, shape;
  CompareResult err;
  double cpu_ms = NAN, gpu_ms = NAN;
};
// Prints the table (CUDA columns "-" where nothing ran on a GPU), the report of every failed comparison,
// and returns the number of failed comparisons.
int print_cpu_cuda_table(const std::vector<CpuCudaRow>& rows);


// Renders `script` with gnuplot, passing outdir='<out_dir>' (the script reads its CSVs from there and
// writes its PNGs there). Returns true when the PNGs were rendered; prints how to render them when
// gnuplot is missing or fails.
bool render_plots(const std::string& script, const std::string& out_dir);

// "1.23e-05", "0.0123", "123": a compact number for tables.
std::string fmt_num(double x, int digits = 3);

}  // namespace dsv3
