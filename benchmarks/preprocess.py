"""Benchmark: our tools/preprocess_data.py vs Megatron-LM's, with sentencepiece's own encoding as the floor.

Corpus: the running interpreter's standard library sources, one jsonl document per file (~1,800 files, ~31 MB,
built here by ``betterai_megatron.data.builtin_corpus``); tokenizer: a 32k BPE trained by
``tools/train_tokenizer.py``'s library (~1-2 min, cached in the work directory). Then, alternating, ``--repeats``
runs of each command with ``--workers 2 --append-eod``, each in a fresh process (imports included: that is what
a user waits for), and the medians:

- ours: ``tools/preprocess_data.py`` end to end;
- Megatron-LM: its ``tools/preprocess_data.py`` from a checkout given by ``--megatron-lm DIR`` or
  ``$MEGATRON_LM_DIR`` (run with ``PYTHONPATH=DIR[:--megatron-pythonpath]``, outputs in the work directory);
  without a checkout this column is skipped with a note;
- floor: a process that has already read the documents calls ``sentencepiece.encode(all_documents,
  num_threads=workers)`` once; the time of that call alone.

The outputs of ours and Megatron-LM are compared byte for byte. Goal (issue 4): identical bytes, at least 2.5x
faster than Megatron-LM end to end, within 1.5x of the floor.

    .venv/bin/python -m benchmarks.preprocess [--megatron-lm /path/to/Megatron-LM] [--repeats 3]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_MEASURE = r"""
import resource, subprocess, sys, time, json
start = time.perf_counter()
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": result.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mib": usage.ru_maxrss / 1024, "stderr_tail": result.stderr[-2000:]}))
"""

_FLOOR = r"""
import json, sys, time
import sentencepiece as spm
model, corpus, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
sp = spm.SentencePieceProcessor(model_file=model)
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
start, cpu = time.perf_counter(), time.process_time()
ids = sp.encode(texts, num_threads=threads, return_type="numpy")
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"encode_s": seconds, "encode_cpu_s": cpu, "tokens": int(sum(len(x) for x in ids))}))
"""


def measure(command: list[str], *, env: dict | None = None, cwd: str | None = None) -> dict:
    """Wall/CPU seconds and the largest process's peak RSS of one command run in a fresh process."""
    output = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True,
                            env=env, cwd=cwd, check=True).stdout
    result = json.loads(output)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result['rc']}):\n{result['stderr_tail']}")
    return result


def prepare(work: Path, *, vocab_size: int) -> tuple[Path, Path]:
    """The corpus jsonl and the tokenizer model, built once per work directory."""
    from betterai_megatron.data.builtin_corpus import write_builtin_corpus
    from betterai_megatron.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_tokenizer,
    )

    corpus = work / "stdlib.jsonl"
    if not corpus.exists():
        stats = write_builtin_corpus(corpus)
        print(f"corpus: {stats.documents} documents, {stats.text_bytes / 1e6:.1f} MB -> {corpus}")
    model = work / f"code{vocab_size // 1000}k.model"
    if not model.exists():
        print(f"training a {vocab_size} BPE tokenizer (cached in {work}) ...", flush=True)
        start = time.perf_counter()
        with open(corpus, encoding="utf-8") as handle:
            texts = (json.loads(line)["text"] for line in handle)
            train_tokenizer(texts, str(model)[:-len(".model")],
                            config=TokenizerTrainingConfig(vocab_size=vocab_size, num_threads=os.cpu_count() or 1))
        print(f"  trained in {time.perf_counter() - start:.0f} s")
    return corpus, model


def _paired(numerators: list[dict], numerator_key: str, denominators: list[dict], denominator_key: str) -> float:
    """Median over repeats of numerator/denominator measured in the same repeat."""
    return statistics.median(n[numerator_key] / d[denominator_key] for n, d in zip(numerators, denominators))


def _outputs_equal(left: str, right: str) -> bool:
    return all(filecmp.cmp(f"{left}_text_document{suffix}", f"{right}_text_document{suffix}", shallow=False)
               for suffix in (".bin", ".idx"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_DIR"),
                        help="Megatron-LM checkout (default $MEGATRON_LM_DIR); skipped when absent")
    parser.add_argument("--megatron-pythonpath", default=os.environ.get("MEGATRON_LM_PYTHONPATH", ""),
                        help="extra PYTHONPATH entries for Megatron-LM's run (e.g. shims it needs)")
    parser.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "betterai-bench-pp"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, model = prepare(work, vocab_size=args.vocab_size)
    flags = ["--input", str(corpus), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
             "--workers", str(args.workers), "--append-eod"]
    ours_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), *flags,
                "--output-prefix", str(work / "ours")]
    megatron = Path(args.megatron_lm) if args.megatron_lm else None
    if megatron is not None and not (megatron / "tools" / "preprocess_data.py").exists():
        print(f"note: {megatron}/tools/preprocess_data.py not found; Megatron-LM column skipped")
        megatron = None
    if megatron is None:
        print("note: no Megatron-LM checkout (--megatron-lm or $MEGATRON_LM_DIR); its column is skipped")
    mlm_env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(megatron), args.megatron_pythonpath) if p))

    runs: dict[str, list[dict]] = {"ours": [], "megatron": [], "floor": []}
    for repeat in range(args.repeats):
        runs["ours"].append(measure(ours_cmd))
        if megatron is not None:
            mlm_cmd = [sys.executable, "tools/preprocess_data.py", *flags, "--output-prefix", str(work / "mlm")]
            runs["megatron"].append(measure(mlm_cmd, env=mlm_env, cwd=str(megatron)))
        floor = subprocess.run([sys.executable, "-c", _FLOOR, str(model), str(corpus), str(args.workers)],
                               capture_output=True, text=True, check=True).stdout
        runs["floor"].append(json.loads(floor))
        print(f"run {repeat + 1}/{args.repeats}: ours {runs['ours'][-1]['wall_s']:.2f} s"
              + (f", Megatron-LM {runs['megatron'][-1]['wall_s']:.2f} s" if runs["megatron"] else "")
              + f", floor {runs['floor'][-1]['encode_s']:.2f} s", flush=True)

    summary = json.loads((work / "ours.summary.json").read_text())
    tokens = sum(summary["tokens"].values())
    ours = statistics.median(r["wall_s"] for r in runs["ours"])
    floor = statistics.median(r["encode_s"] for r in runs["floor"])
    print(f"\ncorpus: {summary['documents']} documents, {summary['input_bytes'] / 1e6:.1f} MB, {tokens:,} tokens; "
          f"{args.workers} workers, {os.cpu_count()} CPUs; medians of {args.repeats}")
    print(f"{'':<34}{'wall s':>9}{'CPU s':>9}{'peak RSS MiB':>14}{'M tokens/s':>12}")
    rows = [("ours (tools/preprocess_data.py)", runs["ours"])]
    if runs["megatron"]:
        rows.append(("Megatron-LM tools/preprocess_data.py", runs["megatron"]))
    for name, results in rows:
        wall = statistics.median(r["wall_s"] for r in results)
        cpu = statistics.median(r["cpu_s"] for r in results)
        rss = max(r["peak_rss_mib"] for r in results)
        print(f"{name:<34}{wall:>9.2f}{cpu:>9.2f}{rss:>14.0f}{tokens / wall / 1e6:>12.2f}")
    floor_cpu = statistics.median(r["encode_cpu_s"] for r in runs["floor"])
    print(f"{'floor: sentencepiece encode only':<34}{floor:>9.2f}{floor_cpu:>9.2f}{'':>14}{tokens / floor / 1e6:>12.2f}")
    # Paired ratios (same repeat, back to back) are steadier than ratios of medians on a shared, busy machine.
    print(f"\nours vs floor: {ours / floor:.2f}x the floor by median wall, paired median "
          f"{_paired(runs['ours'], 'wall_s', runs['floor'], 'encode_s'):.2f}x (goal <= 1.5x)")
    if runs["megatron"]:
        megatron_wall = statistics.median(r["wall_s"] for r in runs["megatron"])
        identical = _outputs_equal(str(work / "ours"), str(work / "mlm"))
        print(f"ours vs Megatron-LM: {megatron_wall / ours:.2f}x faster by median wall, paired median "
              f"{1 / _paired(runs['ours'], 'wall_s', runs['megatron'], 'wall_s'):.2f}x, CPU "
              f"{_paired(runs['megatron'], 'cpu_s', runs['ours'], 'cpu_s'):.2f}x less (goal >= 2.5x)")
        print(f"byte comparison (.bin and .idx): {'IDENTICAL' if identical else 'DIFFERENT'}")
        return 0 if identical else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
