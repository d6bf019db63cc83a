"""The README's REC main job, measured: wall time, peak memory and where the time goes.

    python bench/bench_rec.py [--config experiments/rec_digits_permuted.yaml] [--out DIR]

Runs `growth run CONFIG` in a subprocess and samples the resident memory of its whole process
tree (the campaign and the Ray processes it starts: Ray's head, workers and trials) from /proc
every 0.2 s; peak = the largest sum (Linux). Shares of the wall time, from the run's own
records: search = the searches' wall time (Ray Tune trials training children, the
controller), compression = distillation into the base-size student, training = the rest of
the tasks' time (training the kept network with MWC, Fisher), evaluation and the rest = the
remainder (the R matrix, checkpoints, starting Ray, loading data).

mwc_ratio: REC's wall time over MWC's on the same stream and network (the config with its
strategy section replaced by MWC with REC's lambda and beta), run one after the other.

Last line: `rec: wall_s=W peak_rss_mb=M search_share=S mwc_ratio=R` (targets: W <= 300 on 2
cores, M <= 4096, R <= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Bytes resident in process `root` and all its descendants (from /proc)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parent[int(entry)] = int(fields[1])
        rss[int(entry)] = pages * PAGE
    total, stack, seen = 0, [root], set()
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def mwc_run(config: str, out: Path, env: dict[str, str]) -> float:
    """Wall time of the config run with MWC (REC's lambda and beta) in place of REC."""
    from growth.config import load_config

    s = load_config(config).strategy.settings()
    strategy = {"name": "mwc", **{k: s[k] for k in ("lambda", "beta") if k in s}}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "growth", "run", config, "--out", str(out),
                    "--quiet", "--set", f"strategy={json.dumps(strategy)}"], env=env,
                   check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/rec_digits_permuted.yaml")
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    args = ap.parse_args()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-rec-")
        out = Path(tmp.name) / "run"
    else:
        out = Path(args.out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    mwc_wall = mwc_run(args.config, out.parent / f"{out.name}-mwc", env)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "growth", "run", args.config, "--out",
                             str(out), "--quiet"], env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    watcher.join()
    if code != 0:
        sys.exit(f"growth run exited with {code}")
    m = json.loads((out / "metrics.json").read_text())
    details = m.get("details", {}).get("rec", {})
    search = sum(float(d.get("search_wall_s", 0.0)) for d in details.values())
    compression = sum(float(d["compression"].get("wall_time_s", 0.0))
                      for d in details.values() if isinstance(d.get("compression"), dict))
    tasks = float(sum(m["wall_time_s"]))
    training = tasks - search - compression
    rest = wall - tasks
    print(f"config {args.config}: {len(m['tasks'])} tasks, ACC {m['acc']:.4f}, BWT "
          f"{m['bwt']:.4f}, final size {m['sizes'][-1]['relative']:.3f}x base")
    print(f"children trained {m['search']['children']}, their training time "
          f"{m['search']['child_time_s']:.1f}s")
    for name, secs in (("search", search), ("training", training),
                       ("compression", compression), ("evaluation and the rest", rest)):
        print(f"{name:24s} {secs:7.1f}s  {secs / wall:6.1%}")
    print(f"wall time {wall:.1f}s on {os.cpu_count()} cores; peak resident memory of the "
          f"process tree {peak[0] / 2**20:.0f} MB")
    print(f"MWC on the same stream: wall time {mwc_wall:.1f}s")
    print(f"rec: wall_s={wall:.1f} peak_rss_mb={peak[0] / 2**20:.0f} "
          f"search_share={search / wall:.3f} mwc_ratio={wall / mwc_wall:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
