"""What ``benchmarks.bench_extract`` derives, prints and draws from its measurements."""
from __future__ import annotations

from pathlib import Path


def fixed_s(run: dict) -> float | None:
    """Seconds of a whole process not spent at its steady rate: start-up, imports, the first batch, assembly, exit."""
    if not run.get("steady_img_s"):
        return None
    return run["whole_s"] - run["images"] / run["steady_img_s"]


def ratios(results: dict) -> dict:
    r, bare = results["whole_process"], results["bare_img_s"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "project_fp32_over_plain_whole": ratio(r["plain"]["whole_s"], r["project_fp32"]["whole_s"]),
        "project_bf16_over_plain_whole": ratio(r["plain"]["whole_s"], r["project_bf16"]["whole_s"]),
        "project_fp32_whole_over_bare_fp32": ratio(r["project_fp32"]["whole_img_s"], bare["fp32"]),
        "project_fp32_whole_over_bare_whole_process": ratio(r["bare_fp32"]["whole_s"], r["project_fp32"]["whole_s"])
        if "bare_fp32" in r else None,
        "project_fp32_whole_minus_bare_whole_s": r["project_fp32"]["whole_s"] - r["bare_fp32"]["whole_s"]
        if "bare_fp32" in r else None,
        "project_fp32_steady_over_bare_fp32": ratio(r["project_fp32"]["steady_img_s"], bare["fp32"]),
        # the same, against the bare whole process's own steady rate (its batches, in its own process)
        "project_fp32_steady_over_bare_process_steady": ratio(r["project_fp32"]["steady_img_s"],
                                                              r.get("bare_fp32", {}).get("steady_img_s")),
        # fixed cost: the whole process less its images at its own steady rate; the project's over the bare's
        "project_fp32_fixed_s": fixed_s(r["project_fp32"]),
        "bare_fp32_fixed_s": fixed_s(r.get("bare_fp32", {})),
        "project_bf16_whole_over_bare_bf16_cast": ratio(r["project_bf16"]["whole_img_s"], bare["bf16_cast"]),
        "project_bf16_steady_over_bare_bf16_cast": ratio(r["project_bf16"]["steady_img_s"], bare["bf16_cast"]),
        "bf16_cast_over_autocast": ratio(bare["bf16_cast"], bare["bf16_autocast"]),
        "bf16_cast_over_fp32": ratio(bare["bf16_cast"], bare["fp32"]),
        **({"head_epoch_over_bare": results["head"]["ratio_project_over_bare"],
            "job_speedup_20_epochs": results["job"]["speedup"]} if "head" in results else {}),
    }


def print_summary(results: dict) -> None:
    r = results["whole_process"]
    print("\nphases of the project's whole runs (s): imports, indexing, to the first batch (of which backbone "
          "load), steady, assembly")
    for precision in ("fp32", "bf16"):
        ph = r[f"project_{precision}"]
        print(f"  {precision}: {ph['imports_s']:.2f}, {ph['indexing_s']:.2f}, {ph['to_first_batch_s']:.2f} "
              f"({ph['backbone_load_s']:.2f}), {ph['steady_s']:.2f}, {ph['assembly_s']:.2f}; whole {ph['whole_s']:.2f}")
    print("ratios")
    for key, value in results["ratios"].items():
        print(f"  {key:42s} {value:6.2f}" if value is not None else f"  {key:42s}   n/a")
    print(f"  bf16 cosine to fp32 (min row)    {results['bf16_cosine_min']:.6f}")
    print(f"  fp32 cosine to plain (min row)   {results['fp32_cosine_vs_plain_min']:.7f}")
    print(f"  load average before/after        {results['load_average_before']:.2f} / {results['load_average_after']:.2f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, bare = results["whole_process"], results["bare_img_s"]
    bars = {"plain fp32 (whole)": r["plain"]["whole_img_s"], "project fp32 (whole)": r["project_fp32"]["whole_img_s"],
            "project bf16 (whole)": r["project_bf16"]["whole_img_s"], "bare fp32": bare["fp32"],
            "bare bf16 cast": bare["bf16_cast"], "bare bf16 autocast": bare["bf16_autocast"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    drawn = ax.bar(list(bars), list(bars.values()),
                   color=["#999", "#2a7", "#2a7", "#36c", "#36c", "#36c"])
    ax.bar_label(drawn, fmt="%.0f")
    ax.set_ylabel("images / s")
    ax.set_title(f"fc7 extraction, {results['cpu_kind']}\n{results['images']} images, batch {results['batch_size']}",
                 fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
