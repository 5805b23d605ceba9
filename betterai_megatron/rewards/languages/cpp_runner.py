"""C++ (g++, C++17): one translation unit = harness head + setup + program + tests + harness ``main``.

The job is compiled and run in one sandboxed shell script (``g++`` then ``exec`` of the binary); the wall-clock
budget is ``sandbox.timeout_s + sandbox.compile_timeout_s``. Conventions for C++ problems:

* the program defines functions (a ``main`` of its own is renamed out of the way by a macro);
* tests use ``CHECK(cond)`` (``assert`` is redefined to it after the program), which throws instead of aborting,
  so a failed test is counted and the others still run;
* check mode: ``tests`` is a block of statements; case mode: ``tests`` is a namespace-scope prelude of helpers and
  each case is a block of statements, where ``candidate`` is a macro for the entry point.

The nonce is read from stdin by a static object defined *before* the program in the translation unit, so it is
consumed before any static initializer of the program can read stdin.
"""

from __future__ import annotations

import shutil

from betterai_megatron.rewards.languages.base import CodeJob, LanguageRunner
from betterai_megatron.rewards.sandbox import RawRun, RunSpec

COMPILE_ERROR_MARKER = "\x1ebetterai-compile-error"
_COMPILE_ERROR_PRINTF = "\\036betterai-compile-error"  # the same marker, as printf(1) writes it

_HEAD = r"""#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>
namespace betterai_harness {
struct Nonce { std::string value; Nonce() { std::getline(std::cin, value); } };
static Nonce nonce;
struct CheckFailure : std::runtime_error { using std::runtime_error::runtime_error; };
}  // namespace betterai_harness
#define CHECK(cond) do { if (!(cond)) throw ::betterai_harness::CheckFailure("CHECK(" #cond ") failed"); } while (0)
#define main betterai_user_main
"""

_TAIL = r"""
namespace betterai_harness {
static std::string hex(const std::string& text) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : text.substr(0, 2000)) { out += digits[c >> 4]; out += digits[c & 15]; }
  return out.empty() ? "-" : out;
}
struct Runner {
  std::vector<bool> passed; std::string status = "passed", error;
  void fail(int index, const char* kind, const std::string& what) {
    passed.push_back(false);
    if (error.empty()) { status = kind; error = "case " + std::to_string(index) + ": " + what; }
  }
  void run(void (*test)(), int index) {
    try { test(); passed.push_back(true); }
    catch (const CheckFailure& e) { fail(index, "failed", e.what()); }
    catch (const std::bad_alloc& e) { fail(index, "memory_limit", std::string("std::bad_alloc: ") + e.what()); }
    catch (const std::exception& e) { fail(index, "runtime_error", e.what()); }
    catch (...) { fail(index, "runtime_error", "unknown exception"); }
  }
  void report() {
    std::string line = "\n" + nonce.value + " " + status + " ";
    for (bool ok : passed) line += ok ? '1' : '0';
    line += " " + hex(error) + "\n";
    std::cout << std::flush;
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fflush(stdout);
    std::_Exit(0);  // skip the program's static destructors: the verdict is written
  }
};
}  // namespace betterai_harness
int main() {
  betterai_harness::Runner runner;
"""


class CppRunner(LanguageRunner):
    name = "cpp"

    def toolchain_problem(self) -> str | None:
        if shutil.which(self.config.cxx_compiler) is None:
            return f"C++ compiler not found at sandbox.cxx_compiler={self.config.cxx_compiler!r}"
        return None

    def assemble_program(self, prompt: str, completion: str, entry_point: str) -> str:
        """Prompt + completion, unless the completion repeats the prompt's signature (a whole function)."""
        signature = prompt.strip().splitlines()[-1].rstrip("{ ").strip() if prompt.strip() else ""
        if signature and signature in completion:
            return completion
        return prompt + completion

    def source(self, job: CodeJob) -> str:
        parts = [_HEAD, "// setup\n", job.setup, "\n// program\n#line 1 \"main.cpp\"\n", job.program,
                 "\n#undef main\n#undef assert\n#define assert(cond) CHECK(cond)\n"]
        if job.test_cases is None:
            parts += ["namespace betterai_harness {\nstatic void test_0() {\n", job.tests, "\n}\n}\n"]
            calls = ["  runner.run(betterai_harness::test_0, 0);\n"]
        else:
            parts += [job.tests, f"\n#define candidate {job.entry_point}\nnamespace betterai_harness {{\n"]
            calls = []
            for index, case in enumerate(job.test_cases):
                parts.append(f"static void test_{index}() {{\n{case}\n}}\n")
                calls.append(f"  runner.run(betterai_harness::test_{index}, {index});\n")
            parts.append("}\n")
        parts += [_TAIL, *calls, "  runner.report();\n}\n"]
        return "".join(parts)

    def build_spec(self, job: CodeJob, *, nonce: str) -> RunSpec:
        compiler = shutil.which(self.config.cxx_compiler) or self.config.cxx_compiler
        script = (
            "printf '\\036betterai-started\\n'\n"
            f"if ! {compiler} -std=c++17 -O1 -pipe -w -o {{scratch}}/program {{files}}/main.cpp "
            "2> {scratch}/compile.log; then\n"
            f"  printf '{_COMPILE_ERROR_PRINTF}\\n' >&2\n"
            "  tail -c 4000 {scratch}/compile.log >&2\n  exit 3\nfi\n"
            "exec {scratch}/program\n")
        return RunSpec(argv=["/bin/sh", "-c", script], stdin=(nonce + "\n").encode(),
                       files={"main.cpp": self.source(job).encode("utf-8")},
                       timeout_s=self.config.timeout_s + self.config.compile_timeout_s)

    def label_without_report(self, raw: RawRun) -> tuple[str, str]:
        stderr = raw.stderr.decode("utf-8", errors="replace")
        if COMPILE_ERROR_MARKER in stderr:
            log = stderr.split(COMPILE_ERROR_MARKER, 1)[1].strip().splitlines()
            errors = [line for line in log if "error" in line]
            return "compile_error", (errors[0] if errors else log[-1] if log else "compilation failed")[:2000]
        return super().label_without_report(raw)
