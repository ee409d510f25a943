"""The PNG of a benchmark report: decode latency across the run, and time to first token by prompt length."""

from __future__ import annotations

from pathlib import Path

from edgekit.device.bench.report import BenchReport, as_report


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: the plot is an optional extra."""


def plot_report(report: BenchReport | dict, path: str | Path) -> Path:
    """A PNG: model time of each generated token across the run, and TTFT against prompt length.

    Raises PlotUnavailable (with the install command) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a device
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the plot needs matplotlib: pip install matplotlib") from None
    rep = as_report(report)
    results = rep.results
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        left.plot(range(1, len(r.token_latency_ms) + 1), r.token_latency_ms,
                  label=f"after {r.prompt_tokens} prompt tok, threads {r.threads_label}", linewidth=1)
    left.set_xlabel("generated token")
    left.set_ylabel("model time per token (ms, median over runs)")
    left.set_title("decode latency across the run")
    left.set_ylim(bottom=0)
    left.legend(fontsize="small")
    for threads in dict.fromkeys(r.threads for r in results):
        rs = sorted((r for r in results if r.threads == threads), key=lambda r: r.prompt_tokens)
        xs = [r.prompt_tokens for r in rs]
        med = [r.ttft_ms.median for r in rs]
        err = [[m - r.ttft_ms.min for m, r in zip(med, rs, strict=True)],
               [r.ttft_ms.max - m for m, r in zip(med, rs, strict=True)]]
        right.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"threads {rs[0].threads_label}")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("time to first token (ms, median, min-max)")
    right.set_title("time to first token")
    right.set_ylim(bottom=0)
    right.legend(fontsize="small")
    fig.suptitle(f"{rep.subject}, {rep.created}", fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
