#!/usr/bin/env python
"""GGUF export benchmark (issue 19): the demo adapter exported per type, export time and peak RSS, and held-out
exact match in each runtime next to the adapter's own (4-bit base + adapter).

For each type, two runs of ``qlora-kit export`` in a child process under ``/usr/bin/time -v``:
  1. ``--no-verify``: the export alone (report ``write_seconds``, wall time, peak RSS of the process);
  2. ``--eval-file E [--eval-limit N]``: verification with token-level exact match on the held-out records for the
     4-bit base + adapter, the file in transformers' GGUF loader, and the file in llama.cpp.
Prints a Markdown table; the reports stay in --out-dir.

    python scripts/bench_gguf_export.py --base demo --adapter RUN/run/adapter --eval-file RUN/data/eval.jsonl \
        --out-dir /tmp/gguf-bench [--eval-limit 50] [--quants q8_0 q4_k_m] [--skip-eval]
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time -v: (wall seconds, peak RSS MiB); raises on a non-zero exit."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024
    h, m, s = ([0, 0] + re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", out.stderr).group(1).split(":"))[-3:]
    return int(h) * 3600 + int(m) * 60 + float(s), rss


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--quants", nargs="+", default=["q8_0", "q4_k_m"])
    p.add_argument("--skip-eval", action="store_true", help="only the export-alone runs")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    export = [sys.executable, "-m", "qlora_kit", "export", "--base", args.base, "--adapter", args.adapter,
              "--overwrite"]
    rows = []
    for q in args.quants:
        path = out_dir / f"demo-{q}.gguf"
        wall, rss = timed(export + ["--out", str(path), "--quant", q, "--no-verify"])
        report = json.loads(path.with_suffix(".export_report.json").read_text())
        row = {"quant": q, "mib": report["bytes"] / 2**20, "write_s": report["write_seconds"], "wall_s": wall,
               "rss_mib": rss, "kept": report["weights"]["weight_delta_retained"]}
        if not args.skip_eval:
            ev = out_dir / f"demo-{q}-eval.gguf"
            limit = ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
            row["eval_wall_s"], _ = timed(export + ["--out", str(ev), "--quant", q, "--eval-file", args.eval_file,
                                                    *limit])
            v = json.loads(ev.with_suffix(".export_report.json").read_text())["verification"]
            row.update(records=v["eval_records"], ref=v["reference"].get("exact_match"),
                       hf=v["transformers"].get("exact_match"), cpp=v["llama_cpp"].get("exact_match"),
                       cpp_kept=v["llama_cpp"].get("logit_effect_retained"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| quant | file | write | wall | peak RSS | ΔW kept | records | 4-bit + adapter | transformers (file) "
          "| llama.cpp (file) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['mib']:.1f} MiB | {r['write_s']:.1f} s | {r['wall_s']:.0f} s | {r['rss_mib']:.0f} MiB "
              f"| {pct(r['kept'])} | {r.get('records', '-')} | {pct(r.get('ref'))} | {pct(r.get('hf'))} "
              f"| {pct(r.get('cpp'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
