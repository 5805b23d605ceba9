"""JavaScript (Node.js): ``node -e <harness>`` with the job as JSON on stdin.

The harness runs the setup, the program and the tests as classic scripts in the same global scope
(``vm.runInThisContext``: top-level ``function`` and ``var`` declarations become globals, ``let``/``const`` share
the script scope), so the tests see the program's functions by name. Tests throw to fail; ``assert`` (Node's
``assert`` module) is predefined. In case mode each case runs with ``vm``'s own ``timeout``, and ``candidate``
names the entry point. Only synchronous tests are supported (a returned promise is not awaited).
The harness source is kept here as a string: it is JavaScript, and shipping it as a .js file would need package
data rules.
"""

from __future__ import annotations

import json
import re
import shutil

from betterai_megatron.rewards.languages.base import CodeJob, LanguageRunner, ro_paths_for
from betterai_megatron.rewards.sandbox import RunSpec

HARNESS = r"""
'use strict';
const fs = require('fs');
const vm = require('vm');
const assert = require('assert');
(function main() {
  const job = JSON.parse(fs.readFileSync(0, 'utf8'));
  fs.writeSync(1, '\x1ebetterai-started\n');
  const nonce = job.nonce;
  delete job.nonce;
  const cases = job.test_cases;
  const numTests = cases === null || cases === undefined ? 1 : cases.length;
  const writeSync = fs.writeSync;
  function report(status, passed, error) {
    const bits = passed.map(function (ok) { return ok ? '1' : '0'; }).join('');
    const text = Buffer.from(String(error || '').slice(0, 2000), 'utf8').toString('hex') || '-';
    writeSync(1, '\n' + nonce + ' ' + status + ' ' + bits + ' ' + text + '\n');
    process.exit(0);
  }
  function describe(e) {
    if (e && e.name && e.message !== undefined) return e.name + ': ' + e.message;
    return String(e);
  }
  function statusOf(e) {
    if (e instanceof assert.AssertionError) return 'failed';
    if (e instanceof RangeError && /allocation|memory/i.test(String(e.message))) return 'memory_limit';
    return 'runtime_error';
  }
  const none = new Array(numTests).fill(false);
  globalThis.assert = assert;
  let script;
  try {
    script = new vm.Script(job.program, {filename: 'main.js'});
  } catch (e) {
    report('syntax_error', none, describe(e));
  }
  try {
    if (job.setup) vm.runInThisContext(job.setup, {filename: 'setup.js'});
    script.runInThisContext();
  } catch (e) {
    report(statusOf(e), none, describe(e));
  }
  if (cases === null || cases === undefined) {
    try {
      vm.runInThisContext(job.tests || '', {filename: 'tests.js'});
    } catch (e) {
      report(statusOf(e), [false], describe(e));
    }
    report('passed', [true], '');
  }
  try {
    if (job.tests) vm.runInThisContext(job.tests, {filename: 'tests.js'});
    globalThis.candidate = vm.runInThisContext(job.entry_point);
  } catch (e) {
    report(statusOf(e), none, describe(e));
  }
  const passed = [];
  let firstError = '';
  let firstStatus = '';
  const timeout = Math.max(1, Math.round(job.case_timeout_s * 1000));
  cases.forEach(function (source, index) {
    try {
      vm.runInThisContext(source, {filename: 'case_' + index + '.js', timeout: timeout});
      passed.push(true);
    } catch (e) {
      passed.push(false);
      if (!firstError) {
        firstStatus = statusOf(e);
        firstError = 'case ' + index + ': ' + describe(e);
      }
    }
  });
  report(passed.every(Boolean) ? 'passed' : (firstStatus || 'failed'), passed, firstError);
})();
"""

_FUNCTION_DEFINITION = r"(^|\n)\s*(async\s+)?function\s*\*?\s*{name}\s*\(|(^|\n)\s*(const|let|var)\s+{name}\s*="


class JavaScriptRunner(LanguageRunner):
    name = "javascript"

    def toolchain_problem(self) -> str | None:
        if shutil.which(self.config.node_executable) is None:
            return f"Node.js not found at sandbox.node_executable={self.config.node_executable!r}"
        return None

    def assemble_program(self, prompt: str, completion: str, entry_point: str) -> str:
        """Prompt + completion, unless the completion defines the entry point itself (a full function)."""
        if re.search(_FUNCTION_DEFINITION.format(name=re.escape(entry_point)), completion):
            return completion
        return prompt + completion

    def build_spec(self, job: CodeJob, *, nonce: str) -> RunSpec:
        payload = {"nonce": nonce, "setup": job.setup, "program": job.program, "tests": job.tests,
                   "entry_point": job.entry_point, "test_cases": job.test_cases,
                   "case_timeout_s": self.config.test_case_timeout_s}
        node = shutil.which(self.config.node_executable) or self.config.node_executable
        return RunSpec(argv=[node, "-e", HARNESS], stdin=json.dumps(payload).encode("utf-8"),
                       ro_paths=ro_paths_for(node) if self.isolated else [])
