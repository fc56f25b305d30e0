"""The closed-loop chart: acceptance rate per simulated day, one line per policy (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def acceptance_chart(reports: dict[str, dict[str, Any]], warmup_days: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    styles = {"blanket": "-", "rules": "-", "kairos": "-", "oracle": "--", "ceiling": ":"}
    for name, report in reports.items():
        daily = report["daily_acceptance_rate"]
        ax.plot(
            range(len(daily)),
            [100 * v for v in daily],
            styles.get(name, "-"),
            label=name,
            linewidth=2 if name == "kairos" else 1.4,
        )
    ax.axvspan(0, warmup_days, color="0.9", label="warm-up")
    ax.set_xlabel("simulated day")
    ax.set_ylabel("acceptance rate of delivered offers (%)")
    ax.set_title("Kairos closed loop: acceptance rate by policy")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
