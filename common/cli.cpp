#include "common/cli.h"

#include <fmt/format.h>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <new>

#include "common/device.h"
#include "common/errors.h"

namespace dsv3 {

void add_demo_options(CLI::App& app, DemoOptions& opt, const std::string& default_out) {
  opt.out = default_out;
  app.add_option("--out", opt.out, "folder for CSV files and PNG plots")->capture_default_str();
  app.add_flag("--check", opt.check, "run the self-checks only; exit code 1 if any fails");
  app.add_option("--seed", opt.seed, "random seed")->check(unsigned_integer())->capture_default_str();
}

int run_main(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: error: %s (see --help)\n", app.get_name().c_str(), e.what());
    return 2;
  }
  try {
    return body();
  } catch (const UserError& e) {
    std::fprintf(stderr, "%s: error: %s\n", app.get_name().c_str(), e.what());
    return 2;
  } catch (const std::filesystem::filesystem_error& e) {
    // a path the user gave that cannot be made or used (under a file, read-only, /proc, permissions, disk full)
    std::fprintf(stderr, "%s: error: %s\n", app.get_name().c_str(), e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory: the model, batch or sequence is too large for this machine "
                 "(%.2f GiB available)\n", app.get_name().c_str(), double(available_host_bytes()) / (1 << 30));
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", app.get_name().c_str(), e.what());
    return 1;
  }
}

std::string command_line(int argc, char** argv) {
  std::string s;
  for (int i = 0; i < argc; ++i) s += (i ? " " : "") + std::string(argv[i]);
  return s;
}

}  // namespace dsv3
