"""One command that measures every GPU promise on one GPU, in at most 8 minutes, and prints one table.

    python benchmarks/gpu_check.py                      # on a GPU; without one it runs its CPU smoke mode
    python benchmarks/gpu_check.py --json gpu-check.json
    python benchmarks/gpu_check.py --cpu-smoke          # tiny sizes on the CPU: every code path, "no GPU" figures

Sections, each in a fresh process with its own time limit (an error or a hang in one is a line in the table, and
the others still run), all within ``--budget-s``:

  tests    ``pytest -m gpu``: the GPU test suite's result
  sdxl     an SDXL-sized AutoencoderKL (the public SDXL VAE config, random weights) at 1024 px in bf16:
           ``build_latents`` (decode, encode, write) against the bare model on the same shapes and batches,
           images/s of each and their ratio (goal >= 0.95); device memory peak of each third of the run (flat
           within 2%) and what is left allocated after it (0)
  auto     ``--batch-size auto`` on that VAE at two shapes: the sizes found, out-of-memory splits, trims
  textenc  a T5-XXL-sized encoder (the public config, random weights, bf16, built on the GPU): captions/s of
           ``build_textenc`` against a bare tokenize + forward loop (goal >= 0.9), and how often it was loaded
  offload  a T5-XL-sized encoder under a device-memory cap: streamed from host memory against resident

The sections themselves are in ``gpu_check_sections.py`` and ``gpu_check_text.py``; this file runs them and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET_SECONDS = 470  # the whole check: 8 minutes less a margin for start-up and the table
SECTION_SECONDS = {"tests": 180, "sdxl": 85, "auto": 45, "textenc": 110, "offload": 50}  # each section's own cap;
# they add up to about the budget, and a section that ends early leaves its time to the later ones
MIN_SECTION_SECONDS = 15  # a section with less time left than this is skipped and says so


def main() -> None:
    args = parse_args()
    if args.section:
        sys.path.insert(0, str(HERE))
        from gpu_check_sections import run_section

        run_section(args.section, Path(args.workdir), args.smoke, Path(args.out))
        return
    smoke = args.cpu_smoke or not _cuda_available()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cachebuild-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_all(work, smoke, args.budget_s)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nJSON: {args.json}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the table as JSON to this path")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the default without a GPU)")
    p.add_argument("--budget-s", type=float, default=BUDGET_SECONDS, help=f"seconds in all (default {BUDGET_SECONDS})")
    p.add_argument("--workdir", help="keep models, images and caches here (default: a temporary folder, removed)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def run_all(work: Path, smoke: bool, budget: float) -> dict:
    start = time.monotonic()
    report = {"device": describe_device(smoke), "mode": "cpu-smoke" if smoke else "gpu", "sections": {}}
    for name, cap in SECTION_SECONDS.items():
        left = budget - (time.monotonic() - start)
        if left < MIN_SECTION_SECONDS:
            why = f"out of time ({left:.0f} s of the {budget:.0f} s budget left)"
            report["sections"][name] = {"status": "skipped", "seconds": 0.0, "rows": [], "figures": {}, "error": why}
            continue
        print(f"[gpu_check] {name} (at most {min(cap, left):.0f} s) ...", file=sys.stderr, flush=True)
        report["sections"][name] = run_child(name, work, smoke, min(cap, left))
    report["seconds"] = round(time.monotonic() - start, 1)
    return report


def run_child(name: str, work: Path, smoke: bool, limit: float) -> dict:
    """One section in a fresh process (fresh CUDA state) and its own process group, which is killed whole past
    ``limit`` seconds (decode workers, device processes and pytest's children with it)."""
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "gpu_check.py"), "--section", name, "--workdir", str(work), "--out", str(out)]
    cmd += ["--smoke"] if smoke else []
    env = {**os.environ, "CACHEBUILD_GPU_CHECK_LIMIT": str(int(limit))}  # the tests section sizes its pytest by it
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"error: exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        status = f"timeout after {limit:.0f} s"
    result = json.loads(out.read_text()) if out.exists() else {"rows": [], "figures": {}}
    result["seconds"] = round(time.monotonic() - start, 1)
    if status == "ok" and "error" in result:
        status = "error"
    result["status"] = status
    if status != "ok" and not result.get("error"):
        tail = err.decode("utf-8", "replace").strip().splitlines()
        result["error"] = tail[-1] if tail else status
    return result


def print_table(report: dict) -> None:
    print(f"cachebuild GPU check: {report['device']} ({report['mode']}, {report.get('seconds', 0):.0f} s)")
    rows = [("section", "figure", "value", "goal")]
    for name, section in report["sections"].items():
        rows.append((name, "status", f"{section['status']} ({section['seconds']:.0f} s)", ""))
        rows += [(name, *row) for row in section["rows"]]
        if section.get("error"):
            rows.append((name, "error", section["error"].strip().splitlines()[-1][:110], ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(str(cell).ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def describe_device(smoke: bool) -> str:
    import torch

    if smoke or not torch.cuda.is_available():
        return f"no GPU: CPU, torch {torch.__version__}"
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} (sm {major}.{minor}), torch {torch.__version__}"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
