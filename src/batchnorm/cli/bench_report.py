"""The verdicts and tables of a ``batchnorm bench`` run's results (:mod:`batchnorm.cli.bench`):
the project's CPU performance targets, the plain-text table the command prints, and the
markdown tables docs/performance.md quotes from the committed run."""

from __future__ import annotations

import math

#: Shapes whose output is at least this large (bytes, in float32) are "large" for the
#: targets of COPY_SHARE and "no slower than ATen": smaller ones run from the caches,
#: where the copy baseline is not the limit.
LARGE_BYTES = 16 << 20
#: The share of the same run's copy bandwidth every large case reaches (issue P13; it was
#: 60 % before the kernels' second round).
COPY_SHARE = 0.85


def _by_case(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """The result rows by (label, mode, contender)."""
    return {(row["label"], row["mode"], row["contender"]): row for row in rows}


def targets(rows: list[dict]) -> list[dict]:
    """The project's CPU performance targets, evaluated on these results (absent shapes are
    skipped). docs/performance.md says which a committed run met."""
    checks = []
    find = _by_case(rows).get

    def add(name, row, key, goal):
        if row is not None:
            value = row[key]
            checks.append({"target": name, "value": value, "goal": goal, "met": value >= goal})

    fb = "forward_backward"
    for name, label, goal in [
        ("fwd+bwd (32,128,32,32) NCHW >= 3x ATen", "(32,128,32,32)", 3.0),
        ("fwd+bwd (64,256,28,28) >= 3x ATen", "(64,256,28,28)", 3.0),
        ("fwd+bwd (32,128,32,32) channels_last >= 1.5x ATen", "(32,128,32,32) channels_last", 1.5),
        ("fwd+bwd (4096,1024) >= 2x ATen", "(4096,1024)", 2.0),
    ]:
        add(name, find((label, fb, "ours")), "speedup_vs_baseline", goal)
    for mode in ("forward_train", "eval", fb):
        add(f"{mode} (100,128) no slower than ATen", find(("(100,128)", mode, "ours")),
            "speedup_vs_baseline", 1.0)  # fmt: skip
    for row in rows:
        if row["contender"] == "ours_fused" and row["mode"] == "bn_relu_forward_backward":
            add(f"fused BN+ReLU fwd+bwd {row['label']} >= 1.3x ours + torch.relu", row,
                "speedup_vs_ours_unfused", 1.3)  # fmt: skip
    for row in rows:
        large = 4 * math.prod(row["shape"]) >= LARGE_BYTES
        if large and row["contender"] in ("ours", "ours_fused"):
            case = f"{row['mode']} {row['label']} ({row['contender']})"
            add(f"{case} >= {COPY_SHARE:.0%} of copy bandwidth", row, "fraction_of_copy",
                COPY_SHARE)  # fmt: skip
            add(f"{case} no slower than {row['baseline']}", row, "speedup_vs_baseline", 1.0)
    return checks


def table(results: dict, verdicts: bool = True) -> str:
    """The results as a plain-text table, then the targets (unless ``verdicts`` is False)."""
    head = f"{'shape':<30} {'mode':<25} {'contender':<19} {'median ms':>10} {'speed-up':>9} "
    head += f"{'GB/s':>7} {'of copy':>8}"
    lines = [head, "-" * len(head)]
    for r in results["results"]:
        lines.append(
            f"{r['label']:<30} {r['mode']:<25} {r['contender']:<19} {r['median_ms']:>10.3f} "
            f"{r['speedup_vs_baseline']:>8.2f}x {r['effective_gbps']:>7.1f} "
            f"{r['fraction_of_copy']:>7.0%}"
        )
    lines += ["", "speed-up: against aten (aten+relu, aten+silu for the fused modes)", ""]
    if not verdicts:
        lines.append("targets: not judged on a --quick run (small shapes, few calls)")
        return "\n".join(lines)
    for t in results["targets"]:
        mark = "met" if t["met"] else "NOT met"
        lines.append(f"{mark:>8}  {t['target']}: {t['value']:.2f}")
    return "\n".join(lines)


#: The modes of a fused activation, and its name (the benchmark's contenders "aten+relu",
#: "ours+relu", ... are named after it).
ACTIVATION_MODES = {"bn_relu_forward_backward": "relu", "bn_silu_forward_backward": "silu"}
#: Each activation's name in the markdown tables' headings, and torch's function for it.
_ACTIVATION_TITLES = {"relu": ("ReLU", "torch.relu"), "silu": ("SiLU", "F.silu")}


def markdown(results: dict) -> str:
    """The results as docs/performance.md's four markdown tables: forward + backward (every
    contender, ours' share of copy bandwidth), training forward and eval (ATen's time and
    ours), and BN + ReLU and BN + SiLU forward + backward (fused against unfused)."""
    rows = results["results"]
    labels = list(dict.fromkeys(row["label"] for row in rows))
    row = _by_case(rows)

    def ms(label: str, mode: str, contender: str) -> str:
        return f"{row[label, mode, contender]['median_ms']:.3g} ms"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def grid(head: list[str], body: list[list[str]]) -> list[str]:
        return [line(head), "|" + "---|" * len(head), *map(line, body)]

    fb = "forward_backward"
    out = ["### Forward + backward", ""]
    body = []
    for label in labels:
        ours = row[label, fb, "ours"]
        cells = [ms(label, fb, c) for c in ("aten", "ours", "ours_numba", "compiled_reference")]
        share = f"{ours['fraction_of_copy']:.0%}"
        body.append([label, *cells, f"{ours['speedup_vs_baseline']:.2f}×", share])
    out += grid(["shape", "ATen", "ours", "ours, Numba forced",
                 "torch.compile of the reference", "ours vs ATen",
                 "ours, share of copy bandwidth"], body)  # fmt: skip
    out += ["", "### Training forward and eval", "", "ATen → ours:", ""]
    body = []
    for label in labels:
        cells = [label]
        for mode in ("forward_train", "eval"):
            aten, ours = row[label, mode, "aten"], row[label, mode, "ours"]
            cells.append(f"{aten['median_ms']:.3g} → {ours['median_ms']:.3g} ms "
                         f"({ours['speedup_vs_baseline']:.2f}×)")  # fmt: skip
        body.append(cells)
    out += grid(["shape", "forward (training)", "eval"], body)
    for mode, activation in ACTIVATION_MODES.items():
        title, op = _ACTIVATION_TITLES[activation]
        body = []
        for label in labels:
            fused = row[label, mode, "ours_fused"]
            cells = [ms(label, mode, c) for c in (f"aten+{activation}", f"ours+{activation}",
                                                  "ours_fused")]  # fmt: skip
            body.append([label, *cells, f"{fused['speedup_vs_ours_unfused']:.2f}×",
                         f"{fused['speedup_vs_baseline']:.2f}×"])  # fmt: skip
        out += ["", f"### BN + {title}, forward + backward", ""]
        out += grid(["shape", f"torch.nn + {op}", f"ours + {op}", "`BatchNormAct` (fused)",
                     f"fused vs ours + {activation}", f"fused vs torch.nn + {activation}"],
                    body)  # fmt: skip
    return "\n".join(out)
