"""Plain-text tables of the rows' results, one layout per family of rows."""

from .rows import family, interface, kernels, memory, plans, recurrent, spectral


def verdict(result: dict) -> str:
    """`met`, `MISSED`, or `-` for a row without a target."""
    return {True: "met", False: "MISSED", None: "-"}[result["target_met"]]


def format_results(results: list[dict]) -> str:
    """Every result, grouped: the kernel table first, then the scaling grid, the
    curvature family, memory, overhead, ratios and GEMM rates."""
    by_row = lambda rows: [r for r in results if r["row"] in rows]
    blocks = []
    main = by_row(kernels.ROWS)
    if main:
        blocks.append(format_kernels(main))
    for r in by_row(("scaling",)):
        blocks.append(format_scaling(r))
    if by_row(family.ROWS):
        blocks.append(format_family(by_row(family.ROWS)))
    if by_row(memory.ROWS):
        blocks.append(format_memory(by_row(memory.ROWS)))
    blocks += [format_overhead(r) for r in by_row(("overhead",))]
    blocks += [format_ratios(r) for r in by_row(("ratios",))]
    blocks += [format_gemm(r) for r in by_row(("gemm",))]
    blocks += [interface.format_result(r, verdict(r)) for r in by_row(interface.ROWS)]
    blocks += [recurrent.format_result(r, verdict(r)) for r in by_row(recurrent.ROWS)]
    blocks += [spectral.format_result(r, verdict(r)) for r in by_row(spectral.ROWS)]
    blocks += [plans.format_result(r, verdict(r)) for r in by_row(plans.ROWS)]
    return "\n\n".join(blocks)


def format_kernels(results: list[dict]) -> str:
    header = (
        f"{'row':<6} {'P':>8} {'grad ms':>9} {'struct ms':>10} {'struct/grad':>12} "
        f"{'generic ms':>11} {'gen/struct':>11} {'peak RSS MiB':>13}  target"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        generic = f"{r['generic_s'] * 1e3:11.1f}" if "generic_s" in r else f"{'-':>11}"
        ratio = f"{r['generic_over_structured']:11.0f}" if "generic_s" in r else f"{'-':>11}"
        lines.append(
            f"{r['row']:<6} {r['params']:>8} {r['gradient_s'] * 1e3:9.2f} "
            f"{r['structured_s'] * 1e3:10.2f} {r['structured_over_gradient']:12.1f} "
            f"{generic} {ratio} {r['structured_peak_rss_bytes'] / 2**20:13.0f}  "
            f"{r['target']}: {verdict(r)}"
        )
    return "\n".join(lines)


def format_scaling(result: dict) -> str:
    """The grid (generic over structured, and the structured time), then how every
    cell's figures were obtained."""
    grid = result["grid"]
    hidden_sizes = sorted({cell["hidden"] for cell in grid})
    steps = sorted({cell["steps"] for cell in grid})
    full = result["batch"]
    lines = [
        f"GRU, input 8, 10 classes, batch {full}: generic (extrapolated) / structured",
        f"{'hidden':>8} " + " ".join(f"{'T=' + str(t):>17}" for t in steps),
    ]
    for hidden in hidden_sizes:
        cells = []
        for t in steps:
            found = [c for c in grid if c["hidden"] == hidden and c["steps"] == t]
            if not found:
                cells.append("-")
                continue
            c = found[0]
            mark = "*" if c["structured_batch"] < full else " "
            cells.append(f"{c['generic_over_structured']:6.1f}x ({c['structured_s']:6.2f} s){mark}")
        lines.append(f"{hidden:>8} " + " ".join(f"{c:>17}" for c in cells))
    lines += [
        f"generic: a prefix of k (at most {result['basis']}) Hessian-vector products in plain "
        "JAX (linearize of the gradient, vmap over one-hot vectors), t s, at the full batch;",
        "  generic = g + (t - g) x P / k, g the jitted gradient's time;",
        f"* structured timed on b < {full} samples, times {full} / b (predicted over "
        f"{result['cap_s']:g} s at the full batch). Per cell:",
    ]
    for c in grid:
        structured = (
            "timed in full"
            if c["structured_batch"] == full
            else f"b = {c['structured_batch']}, x {full // c['structured_batch']}, compiled ahead"
        )
        lines.append(
            f"  hidden {c['hidden']:>3} T={c['steps']:<3} P = {c['params']:>6}: structured "
            f"{c['structured_s']:.2f} s ({structured}); generic k = {c['products']} "
            f"(vmap {c['products_chunk']}, kernel {c['kernel_chunk']}), t = "
            f"{c['prefix_s']:.2f} s, g = {c['gradient_s'] * 1e3:.1f} ms: "
            f"{c['generic_extrapolated_s']:.1f} s"
        )
    return "\n".join(lines)


def format_family(results: list[dict]) -> str:
    lines = []
    for r in results:
        if r["row"] == "ggn":
            g = r["gradient_s"]
            lines += [
                f"ggn (mlp2, P = {r['params']}, batch {r['batch']}): gradient "
                f"{g * 1e3:.2f} ms; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
                f"  GGN structured      {r['ggn_s'] * 1e3:8.2f} ms  {r['ggn_s'] / g:6.2f}x grad",
                f"  GGN, no finite check {r['ggn_unchecked_s'] * 1e3:7.2f} ms  "
                f"{r['ggn_unchecked_s'] / g:6.2f}x grad",
                f"  GGN by VJPs         {r['ggn_generic_s'] * 1e3:8.2f} ms  "
                f"{r['ggn_generic_s'] / g:6.2f}x grad",
                f"  empirical Fisher    {r['empirical_fisher_s'] * 1e3:8.2f} ms  "
                f"{r['empirical_fisher_s'] / g:6.2f}x grad",
                f"  Fisher, 1 draw      {r['fisher_s'] * 1e3:8.2f} ms  "
                f"{r['fisher_s'] / g:6.2f}x grad",
                f"  target {r['target']}: {verdict(r)}",
                "",
            ]
    hutchinson = [r for r in results if r["row"].startswith("hutch-")]
    if hutchinson:
        header = (
            f"{'row':<11} {'setting':<11} {'loss':>9} {'error':>8} {'error cv':>9} "
            f"{'cv/plain':>9} {'ms':>8} {'ms cv':>8} {'exact ms':>9}"
        )
        lines += [
            f"Hutchinson, {family.HUTCHINSON_PROBES} probes: relative L1 error, mean of "
            f"{family.HUTCHINSON_KEYS} keys",
            header,
            "-" * len(header),
        ]
        for r in hutchinson:
            for name, f in r["settings"].items():
                lines.append(
                    f"{r['row']:<11} {name:<11} {f['loss']:9.2e} {f['plain_error']:8.3f} "
                    f"{f['cv_error']:9.4f} {f['cv_over_plain']:9.3f} {f['plain_s'] * 1e3:8.1f} "
                    f"{f['cv_s'] * 1e3:8.1f} {f['exact_s'] * 1e3:9.1f}"
                )
            lines.append(f"  target {r['target']}: {verdict(r)}")
    return "\n".join(lines).rstrip()


def format_memory(results: list[dict]) -> str:
    first = results[0]
    lines = [
        f"generic kernel, MLP 128-256-256-10 (P = {first['params']}), batch 32; "
        f"a jnp.eye(P) basis alone: {first['eye_bytes'] / 2**30:.1f} GiB",
        f"{'row':<12} {'budget MiB':>10} {'chunk':>7} {'s (with compile)':>17} "
        f"{'RSS before MiB':>15} {'peak RSS MiB':>13}  target",
    ]
    lines.append("-" * len(lines[-1]))
    for r in results:
        lines.append(
            f"{r['row']:<12} {r['budget_bytes'] / 2**20:>10.0f} {r['chunk']:>7} "
            f"{r['seconds_with_compilation']:>17.1f} {r['rss_before_bytes'] / 2**20:>15.0f} "
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}  {r['target']}: {verdict(r)}"
        )
    return "\n".join(lines)


def format_overhead(result: dict) -> str:
    header = (
        f"{'model':<10} {'P':>7} {'batch':>5} {'function':<17} {'direct ms':>10} "
        f"{'jitted ms':>10} {'overhead ms':>12}"
    )
    lines = [
        "overhead: a call minus the same call in an outer eqx.filter_jit (default options; "
        f"medians of {result['rounds']} interleaved rounds)",
        header,
        "-" * len(header),
    ]
    for c in result["calls"]:
        lines.append(
            f"{c['model']:<10} {c['params']:>7} {c['batch']:>5} {c['function']:<17} "
            f"{c['direct_s'] * 1e3:10.3f} {c['jitted_s'] * 1e3:10.3f} "
            f"{c['overhead_s'] * 1e3:12.3f}"
        )
    lines.append(f"  target {result['target']}: {verdict(result)}")
    return "\n".join(lines)


def format_ratios(result: dict) -> str:
    g = result["gradient_s"]
    lines = [
        f"ratios (mlp2, P = {result['params']}, batch {result['batch']}; medians of "
        f"{result['rounds']} interleaved rounds): gradient {g * 1e3:.2f} ms"
    ]
    for name, label in (("ggn", "GGN diagonal"), ("hessian", "Hessian diagonal")):
        ratio = result[f"{name}_over_gradient"]
        bound = result[f"{name}_target"]
        lines.append(
            f"  {label:<17} {result[f'{name}_s'] * 1e3:8.2f} ms  {ratio:6.2f}x grad  "
            f"target <= {bound:g}: {'met' if ratio <= bound else 'MISSED'}"
        )
    lines.append(f"  target {result['target']}: {verdict(result)}")
    return "\n".join(lines)


def format_gemm(result: dict) -> str:
    header = f"{'shape':<36} {'GFLOP':>8} {'GFLOP/s':>9}  note"
    lines = [
        f"gemm: float32 matrix-multiply rate, jitted (median of {result['repeats']} calls)",
        header,
        "-" * len(header),
    ]
    for s in result["shapes"]:
        line = f"{s['shape']:<36} {s['flops'] / 1e9:8.3f} {s['gflops_per_s']:9.1f}  {s['note']}"
        lines.append(line.rstrip())
    lines.append(f"  target {result['target']}: {verdict(result)}")
    return "\n".join(lines)


def format_ab(report: dict) -> str:
    """The A/B table: per row and figure, the median over rounds of the baseline and of
    the current tree, and new / old."""
    header = (
        f"{'row':<11} {'figure':<34} {'unit':<7} {'baseline':>10} {'current':>10} {'new/old':>8}"
    )
    lines = [
        f"A/B: baseline {report['baseline_ref']} ({report['baseline_commit'][:12]}) against "
        f"the working tree; medians of {report['rounds']} alternating rounds, each side in "
        "its own process per round",
        f"  baseline curvzoo: {', '.join(report['curvzoo_files']['baseline'])}",
        f"  current curvzoo:  {', '.join(report['curvzoo_files']['current'])} "
        f"(HEAD {report['current_commit'][:12]}"
        + (", with uncommitted changes in curvzoo/)" if report["current_changed"] else ")"),
        header,
        "-" * len(header),
    ]
    for entry in report["figures"]:
        old, new = entry["baseline"], entry["current"]
        ratio = f"{new / old:8.3f}" if old else f"{'-':>8}"
        lines.append(
            f"{entry['row']:<11} {entry['figure'][:34]:<34} {entry['unit']:<7} "
            f"{old:10.4g} {new:10.4g} {ratio}"
        )
    return "\n".join(lines)
