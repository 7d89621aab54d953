"""Converting a release-sized official `.tar.gz` (benchmarks/write_official_archive.py): `honeybee-convert` against
a plain `tar xzf` + `cp` of the same archive.

    python benchmarks/bench_convert_archive.py /big/7B-C-Abs-M144.tar.gz --work /big/bench --repeats 3

Each repeat runs, in this order, each as a subprocess: `tar xzf ARCHIVE` (into WORK/x), `cp -r` of what it
unpacked (into WORK/y), then `honeybee-convert ARCHIVE WORK/out --work-dir WORK` (as `python -m honeybee_hf.convert`:
the checkout being measured; with a stand-in 32000-token tokenizer: Vicuna's is not downloadable here); what each
wrote is deleted before the next. While one runs, a sampler
reads every 0.1 s the anonymous memory (`RssAnon` of /proc/<pid>/status: the page cache and memory-mapped files
excluded) of the process and all its descendants (listed every second), and every 0.2 s the bytes allocated under
WORK: "peak extra disk" for tar is what it unpacked, for cp both copies, for the converter the output written so
far plus any weight file it spooled (it spools none of a release archive since it reads each `.bin` from the stream;
before, it spooled each official shard); "spool" is the spooled file alone. Free disk is checked first.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO / "tests"))
from utils.official_format import stand_in_tokenizer  # noqa: E402

OFFICIAL_VOCAB = 32000


def _children(pid):
    kids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _rss_anon(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pids(pid):
    pids, todo = [], [pid]
    while todo:
        pids.append(todo.pop())
        todo += _children(pids[-1])
    return pids


def allocated_bytes(folder, match=None):
    total = 0
    for root, _, files in os.walk(folder):
        if match is not None and match not in root:
            continue
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def measure(command, work):
    """(wall s, peak tree RssAnon, peak bytes under `work`, peak bytes in the converter's spool folder)."""
    peaks = {"anon": 0, "disk": 0, "spool": 0}
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    stop = threading.Event()

    def sample_disk():
        while not stop.wait(0.2):
            peaks["disk"] = max(peaks["disk"], allocated_bytes(work))
            peaks["spool"] = max(peaks["spool"], allocated_bytes(work, ".unpack-"))

    sampler = threading.Thread(target=sample_disk, daemon=True)
    sampler.start()
    tree, listed = [process.pid], 0.0
    while process.poll() is None:
        if time.perf_counter() - listed > 1.0:  # listing /proc costs CPU the measured command needs
            tree, listed = tree_pids(process.pid), time.perf_counter()
        peaks["anon"] = max(peaks["anon"], sum(_rss_anon(pid) for pid in tree))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed: {process.stderr.read().strip()}")
    return wall, peaks["anon"], peaks["disk"], peaks["spool"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="an empty folder on the disk to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-cp", action="store_true", help="skip the cp -r row (a disk that cannot hold two unpacked copies)"
    )
    parser.add_argument("--keep", type=Path, help="move the last converted folder here instead of deleting it")
    parser.add_argument("--out", type=Path, help="markdown report (default benchmarks/results/convert_<archive>.md)")
    args = parser.parse_args()

    size = args.archive.stat().st_size
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    need = (1.1 if args.no_cp else 2.3) * size
    if free < need:
        sys.exit(f"bench_convert_archive: {args.work} has {free / 1e9:.1f} GB free; this run needs {need / 1e9:.0f} GB")
    tokenizer = stand_in_tokenizer(Path(tempfile.mkdtemp(prefix="tokenizer-", dir=args.work)), OFFICIAL_VOCAB)
    convert = [sys.executable, "-m", "honeybee_hf.convert"]  # honeybee-convert, from the checkout being measured
    stem = args.archive.name.removesuffix(".tar.gz")
    x, y, out = args.work / "x", args.work / "y", args.work / "out"
    copy = "cp -r (of the unpacked folder)"
    runs = {"tar xzf": [], **({} if args.no_cp else {copy: []}), "honeybee-convert": []}
    loads = []
    for repeat in range(args.repeats):
        loads.append(os.getloadavg()[0])
        x.mkdir()
        runs["tar xzf"].append(measure(["tar", "xzf", str(args.archive), "-C", str(x)], args.work))
        if not args.no_cp:
            runs[copy].append(measure(["cp", "-r", str(x), str(y)], args.work))
            shutil.rmtree(y)
        shutil.rmtree(x)
        runs["honeybee-convert"].append(
            measure(
                [
                    *convert,
                    str(args.archive),
                    str(out),
                    "--tokenizer",
                    str(tokenizer),
                    "--quiet",
                    "--work-dir",
                    str(args.work),
                ],
                args.work,
            )
        )
        out_bytes = allocated_bytes(out)
        if args.keep and repeat == args.repeats - 1:
            out.rename(args.keep)
        else:
            shutil.rmtree(out)
    shutil.rmtree(tokenizer)
    loads.append(os.getloadavg()[0])

    tar_wall = C.median([r[0] for r in runs["tar xzf"]])
    rows = []
    for name, results in runs.items():
        walls = [r[0] for r in results]
        rows.append(
            [
                name,
                f"{C.median(walls):.1f} ({', '.join(f'{w:.0f}' for w in walls)})",
                f"{C.median(walls) / tar_wall:.2f}",
                f"{max(r[1] for r in results) / 2**30:.2f}",
                f"{max(r[2] for r in results) / 1e9:.1f}",
                f"{max(r[3] for r in results) / 1e9:.1f}" if name == "honeybee-convert" else "–",
            ]
        )
    import torch

    lines = C.header(
        f"Converting `{args.archive.name}` ({size / 1e9:.1f} GB) from its archive",
        torch.device("cpu"),
        torch.bfloat16,
        C.command_line(),
        [
            f"{args.repeats} repeats, each {', '.join(runs)} in turn; 1-min load average before each "
            f"repeat and at the end: {', '.join(f'{v:.1f}' for v in loads)} (other developers' processes share the "
            "cores and the disk)",
            f"converted folder: {out_bytes / 1e9:.1f} GB; the archive `{stem}` as written by "
            "benchmarks/write_official_archive.py",
        ],
    )
    lines += C.table(
        [
            "command",
            "wall s, median (runs)",
            "÷ tar xzf",
            "peak anon. memory GiB (tree)",
            "peak extra disk GB",
            "of which spool GB",
        ],
        rows,
    )
    report = C.write_report(lines, args.out or C.RESULTS / f"convert_{stem}.md")
    print("\n".join(lines))
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
