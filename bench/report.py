#!/usr/bin/env python3
"""bench/report.py: turn bench/run's raw results into medians, ratios, a table, a plot.

usage: report.py --raw RAW.tsv --status STATUS.tsv --meta META.json --json OUT.json
                 --svg OUT.svg [--md BENCHMARKS.md]
       report.py --from-json bench/results/latest.json --svg bench/ratios.svg [--md BENCHMARKS.md]
                 (re-render from kept results, no re-run)

RAW.tsv: target, metric, run, value (a number or n/a), one line per measurement.
STATUS.tsv: target, workload, ok|fail|n/a, reason.
Writes OUT.json (everything, per-run values included), OUT.svg (the ratios as relative
speed), prints the markdown table, and with --md replaces the section between
<!-- bench/run:begin --> and <!-- bench/run:end --> of that file (or appends it).
"""
import argparse
import json
import os
import statistics
import sys

BEGIN = "<!-- bench/run:begin -->"
END = "<!-- bench/run:end -->"
TARGET_ORDER = ["native", "tmpfs", "passthrough_ll", "passthrough_ll-strict", "bindfs", "snapfs-ext4", "snapfs-tmpfs", "snapfs-devfuse"]
REFS = ["native", "passthrough_ll"]

# key, workload, label (formatted with the run's config), unit, higher is better
METRICS = [
    ("seq_write", "fio", "seq write 1 MiB, {seq_size} file", "MiB/s", True),
    ("seq_read_cold", "fio", "seq read 1 MiB, cold", "MiB/s", True),
    ("seq_read_warm", "fio", "seq read 1 MiB, warm", "MiB/s", True),
    ("randread_psync", "fio", "rand read 4 KiB, psync QD1, {rand_io} over {rand_size}", "IOPS", True),
    ("randread_libaio16", "fio", "rand read 4 KiB, libaio QD16", "IOPS", True),
    ("randwrite_psync", "fio", "rand write 4 KiB, psync QD1", "IOPS", True),
    ("randwrite_libaio16", "fio", "rand write 4 KiB, libaio QD16", "IOPS", True),
    ("meta_create", "meta", "create {meta_files} files in {meta_dirs} dirs", "s", False),
    ("meta_stat", "meta", "stat {meta_files} files", "s", False),
    ("meta_list", "meta", "readdir {meta_dirs} dirs", "s", False),
    ("meta_unlink", "meta", "unlink {meta_files} files", "s", False),
    ("metasmall_create", "metasmall", "create {metasmall_files} files in {meta_dirs} dirs", "s", False),
    ("metasmall_stat", "metasmall", "stat {metasmall_files} files", "s", False),
    ("metasmall_list", "metasmall", "readdir {meta_dirs} dirs ({metasmall_files} files)", "s", False),
    ("metasmall_unlink", "metasmall", "unlink {metasmall_files} files", "s", False),
    ("untar", "untar", "untar {untar_src} ({untar_entries} entries, {untar_mib} MiB)", "s", False),
    ("ls_lR_cold", "untar", "ls -lR, cold", "s", False),
    ("ls_lR_warm", "untar", "ls -lR, warm", "s", False),
    ("tar_c", "untar", "tar c (data cold)", "s", False),
    ("rm_rf", "untar", "rm -rf", "s", False),
    ("git_clone", "git", "git clone --no-hardlinks, {git_files} files", "s", False),
    ("git_status", "git", "git status", "s", False),
    ("cargo_build", "cargo", "cargo build (debug, libc + log)", "s", False),
    ("peak_rss", "rss", "snapfs peak RSS, {rss_size} seq write", "MiB", False),
]


def load(args):
    with open(args.meta) as f:
        meta = json.load(f)
    raw = {}
    with open(args.raw) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            t, m, r, v = parts
            raw.setdefault((t, m), []).append((int(r), v))
    status = {}
    with open(args.status) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                status[(parts[0], parts[1])] = (parts[2], parts[3] if len(parts) > 3 else "")
    return meta, raw, status


def aggregate(meta, raw, status):
    targets = [t for t in TARGET_ORDER if t in meta["targets"]]
    results = {}
    for key, wl, _label, _unit, _hib in METRICS:
        if wl not in meta["workloads"]:
            continue
        row = {}
        for t in targets:
            entries = raw.get((t, key), [])
            st, reason = status.get((t, wl), ("missing", "not run"))
            values = [float(v) for r, v in entries if v not in ("n/a", "fail")]
            cell = {"runs": values, "status": st}
            if any(v == "n/a" for _r, v in entries) or st == "n/a":
                cell.update(median="n/a", status="n/a")
            elif values and (len(values) >= meta["runs"] or st == "ok"):
                cell["median"] = statistics.median(values)
                cell["status"] = "ok"
            else:
                cell.update(median="fail", status="fail", reason=reason)
            row[t] = cell
        for t, cell in row.items():
            for ref in REFS:
                refcell = row.get(ref)
                ok = (
                    isinstance(cell["median"], float)
                    and refcell is not None
                    and isinstance(refcell["median"], float)
                    and refcell["median"] > 0
                )
                cell["vs_" + ref] = cell["median"] / refcell["median"] if ok else None
        results[key] = row
    return targets, results


def fmt_value(v, unit):
    if not isinstance(v, float):
        return v
    if unit == "s":
        return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def fmt_ratio(r):
    if r is None:
        return "n/a"
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}" if r < 10 else f"{r:.1f}"


def human(size):
    """fio-style size (2g, 256m, 4k) as text (2 GiB, 256 MiB, 4 KiB)."""
    size = str(size).strip()
    units = {"k": "KiB", "m": "MiB", "g": "GiB", "t": "TiB"}
    if size and size[-1].lower() in units:
        return f"{size[:-1]} {units[size[-1].lower()]}"
    return f"{size} bytes"


def labels(meta):
    cfg = dict(meta["config"])
    for k in ("seq_size", "rand_size", "rand_io", "rss_size"):
        cfg[k] = human(cfg[k])
    cfg["meta_files"] = f"{cfg['meta_files']:,}"
    cfg["metasmall_files"] = f"{cfg.get('metasmall_files', 0):,}"
    return {k: label.format(**cfg) for k, _w, label, _u, _h in METRICS}


def table(meta, targets, results):
    lab = labels(meta)
    head = "| workload | unit | better | " + " | ".join(targets) + " |"
    lines = [head, "|" + "---|" * (3 + len(targets))]
    for key, _wl, _label, unit, hib in METRICS:
        if key not in results:
            continue
        cells = []
        for t in targets:
            c = results[key][t]
            v = fmt_value(c["median"], unit)
            if isinstance(c["median"], float):
                rn = "—" if t == "native" else fmt_ratio(c["vs_native"])
                rp = "—" if t == "passthrough_ll" else fmt_ratio(c["vs_passthrough_ll"])
                v = f"{v} ({rn} / {rp})"
            cells.append(v)
        better = "higher" if hib else "lower"
        lines.append(f"| {lab[key]} | {unit} | {better} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(meta, targets, results, path):
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "bench/run"
    import matplotlib.pyplot as plt

    lab = labels(meta)
    keys = [k for k, *_ in METRICS if k in results and k != "peak_rss"]
    hib = {k: h for k, _w, _l, _u, h in METRICS}
    colors = {
        "native": "#555555",
        "tmpfs": "#9e9e9e",
        "passthrough_ll": "#1f77b4",
        "passthrough_ll-strict": "#9467bd",
        "bindfs": "#ff7f0e",
        "snapfs-ext4": "#2ca02c",
        "snapfs-tmpfs": "#98df8a",
        "snapfs-devfuse": "#bcbd22",
    }
    refs = [r for r in REFS if r in targets]
    if not keys or not refs:
        return False
    fig, axes = plt.subplots(1, len(refs), figsize=(7 * len(refs), 0.5 * len(keys) + 2), sharey=True, squeeze=False)
    handles = {}
    for ax, ref in zip(axes[0], refs):
        others = [t for t in targets if t != ref]
        h = 0.8 / max(len(others), 1)
        for i, t in enumerate(others):
            ys, xs = [], []
            for j, k in enumerate(keys):
                r = results[k][t]["vs_" + ref]
                if r is None or r <= 0:
                    continue
                ys.append(j - 0.4 + h * (i + 0.5))
                xs.append(r if hib[k] else 1 / r)
            handles[t] = ax.barh(ys, xs, height=h, color=colors.get(t), label=t)
        for j, k in enumerate(keys):
            if not isinstance(results[k].get(ref, {}).get("median"), float):
                ax.text(1, j, f" {ref}: {results[k].get(ref, {}).get('median', 'n/a')}", va="center", fontsize=7)
        ax.axvline(1, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"relative speed vs {ref}", fontsize=10)
        ax.set_xlabel("throughput ratio, or reference time / target time (log scale; > 1 is faster)", fontsize=8)
        ax.grid(axis="x", which="both", linewidth=0.3)
    ax0 = axes[0][0]
    ax0.set_yticks(range(len(keys)))
    ax0.set_yticklabels([lab[k] for k in keys], fontsize=8)
    ax0.set_ylim(len(keys) - 0.5, -0.5)  # first metric on top (the axes are shared: set once)
    order = [t for t in targets if t in handles]
    fig.legend([handles[t] for t in order], order, loc="lower center", ncol=len(order), fontsize=8, frameon=False)
    fig.suptitle(f"bench/run: median of {meta['runs']} run(s), {meta['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return True


def section(meta, targets, results, table_md, status, svg_rel):
    m = meta["machine"]
    cfg = meta["config"]
    mins, secs = divmod(meta["duration_s"], 60)
    opts = meta["snapfs_opts"] or "defaults"
    fails = [(t, w, r) for (t, w), (s, r) in sorted(status.items()) if s == "fail"]
    out = [
        BEGIN,
        "## Against other filesystems",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM, kernel {m['kernel']}; disk filesystem "
        f"{m['disk_fs']}" + (f" ({m['disk_fs_options']})" if m.get("disk_fs_options") else "")
        + (f"; fuse.enable_uring={m['fuse_enable_uring']}" if m.get("fuse_enable_uring") else "") + ".",
        f"Command: `{meta['command']}` ({meta['date'][:10]}, took {mins} min {secs} s). snapfs: {meta['snapfs']}; options: {opts}.",
        "",
        "Targets: **native** a directory on the ext4 disk (the disk's ceiling); **tmpfs** (the CPU's ceiling); "
        "**passthrough_ll** libfuse's low-level passthrough example over an ext4 directory with "
        "`-o writeback,cache=always` (FUSE's own ceiling); **passthrough_ll-strict** the same with "
        "`-o default_permissions,xattr`: the kernel checks permissions and xattrs are served, as snapfs (and any "
        "multi-user POSIX filesystem) must, so it shows what those two cost FUSE itself; **bindfs** `--multithreaded -o big_writes` over an ext4 "
        "directory; **snapfs-ext4** snapfs with its store on ext4; **snapfs-tmpfs** snapfs with its store on a tmpfs "
        "(its CPU cost alone); **snapfs-devfuse** snapfs with its store on ext4 and `-o nouring`, its requests "
        "through `/dev/fuse` rather than FUSE over io_uring (which the other two use where the kernel has it). Every run of every workload gets a fresh target: mounted anew, empty. "
        "Runs go in rounds (run 1 of every target, then run 2, ...), so that a slow spell of the machine "
        "does not fall on every run of one target; even rounds go through the targets backwards, so that no "
        "target always runs right after the same one (a deletion on ext4 can slow the disk's next user for "
        "seconds), and every run starts after a `sync`.",
        "",
        f"Workloads: fio (buffered, `end_fsync=1` on writes, the fsync inside the figure; sequential on a "
        f"{human(cfg['seq_size'])} file, cold = after `echo 3 > drop_caches`; random: {human(cfg['rand_io'])} of 4 KiB I/O over a "
        f"{human(cfg['rand_size'])} file, each block at most once, caches dropped first, capped at "
        f"{cfg['rand_runtime_cap_s']} s); bench/meta.c (create, stat, readdir, unlink), at "
        f"{cfg['meta_files']:,} files and again at {cfg.get('metasmall_files', 0):,}, few enough for passthrough_ll, which "
        f"holds an fd per inode, under this machine's fd limit; "
        f"untar of a tarball of {cfg['untar_src']} then `ls -lR` cold and warm, `tar c | cat > /dev/null`, `rm -rf`; "
        f"`git clone --no-hardlinks` of a local repository then `git status`; `cargo build --offline` of a generated "
        f"12-module crate depending on libc and log; the snapfs daemon's VmHWM after a {human(cfg['rss_size'])} sequential "
        f"write.",
        "",
        f"Each cell: the median of {meta['runs']} run(s), then (target ÷ native / target ÷ passthrough_ll). "
        "MiB/s and IOPS rows: higher is better, so a ratio above 1 beats the reference. Seconds and MiB rows: lower "
        "is better, so a ratio below 1 beats the reference. `fail`: the workload failed on that target; `n/a`: not "
        "applicable.",
        "",
        table_md,
        "",
    ]
    if svg_rel:
        out += [
            f"![ratios to native and to passthrough_ll]({svg_rel})",
            "",
            f"The plot ([{svg_rel}]({svg_rel})) shows the same ratios as relative speed, higher is better: the "
            "throughput ratio as is, and for timed rows the reference's time over the target's (the inverse of the "
            "table's ratio). Log scale; the line at 1 is the reference.",
            "",
        ]
    if fails:
        out.append("Failures:")
        out.append("")
        out += [f"- {w} on {t}: {r}" for t, w, r in fails]
    else:
        out.append("Failures: none.")
    out += ["", "Raw results, every run: `bench/results/latest.json`.", END]
    return "\n".join(out) + "\n"


def update_md(path, text):
    old = open(path).read() if os.path.exists(path) else "# snapfs benchmarks\n"
    if BEGIN in old and END in old:
        a = old.index(BEGIN)
        b = old.index(END) + len(END)
        if b < len(old) and old[b] == "\n":
            b += 1
        new = old[:a] + text + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw")
    ap.add_argument("--status")
    ap.add_argument("--meta")
    ap.add_argument("--json", help="write everything here")
    ap.add_argument("--from-json", help="re-render the table, plot and section from a results file")
    ap.add_argument("--svg", required=True)
    ap.add_argument("--md")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            meta = json.load(f)
        results = meta["results"]
        targets = [t for t in TARGET_ORDER if t in meta["targets"]]
        status = {(s["target"], s["workload"]): (s["status"], s["reason"]) for s in meta["status"]}
    else:
        if not (args.raw and args.status and args.meta and args.json):
            ap.error("--raw, --status, --meta and --json are needed (or --from-json)")
        meta, raw, status = load(args)
        targets, results = aggregate(meta, raw, status)
        lab = labels(meta)
        doc = dict(meta)
        doc["metrics"] = [
            {"key": k, "workload": w, "label": lab[k], "unit": u, "better": "higher" if h else "lower"}
            for k, w, _l, u, h in METRICS
            if k in results
        ]
        doc["results"] = results
        doc["status"] = [
            {"target": t, "workload": w, "status": s, "reason": r} for (t, w), (s, r) in sorted(status.items())
        ]
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    table_md = table(meta, targets, results)
    svg_rel = None
    try:
        if plot(meta, targets, results, args.svg):
            svg_rel = os.path.relpath(args.svg, os.path.dirname(os.path.abspath(args.md or args.svg)))
    except Exception as e:  # the numbers matter more than the picture
        print(f"report.py: plot failed: {e}", file=sys.stderr)
    print()
    print(f"median of {meta['runs']} run(s); cells: value (target/native / target/passthrough_ll)")
    print(table_md)
    fails = [(t, w, r) for (t, w), (s, r) in sorted(status.items()) if s == "fail"]
    for t, w, r in fails:
        print(f"FAILED: {w} on {t}: {r}")
    if args.md:
        update_md(args.md, section(meta, targets, results, table_md, status, svg_rel))
        print(f"updated {args.md}")


if __name__ == "__main__":
    main()
