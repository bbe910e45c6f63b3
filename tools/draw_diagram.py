"""Draw medcap's architecture diagram (diagram.png at the repository root).

    python tools/draw_diagram.py [--out diagram.png] [--num-image-tokens 50]

An image goes through BiomedCLIP's ViT-B/16 and the projector and becomes
50 soft tokens; they replace the 50 placeholder tokens in the prompt of a
frozen Llama-3.1-8B-Instruct. Only the vision side (blue) is trained.
Needs matplotlib only; no model is built.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TRAINED = "#4C72B0"
FROZEN = "#8C8C8C"
TEXT = "#55A868"
SOFT = "#DD8452"


def _box(ax, x, y, w, h, label, color, *, text_color="white", fontsize=10, style="round,pad=0.02,rounding_size=0.08"):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=color, edgecolor="black", linewidth=1.0))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", color=text_color, fontsize=fontsize, wrap=True)


def _arrow(ax, x0, y0, x1, y1, label=None, **kw):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", lw=1.4, color="black", **kw))
    if label:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, label, ha="center", va="bottom", fontsize=8, color="#333333")


def draw(out: Path, num_image_tokens: int = 50) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(13, 5.6))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 5.6)
    ax.axis("off")

    # the image: a little synthetic scan, drawn from numbers (no patient data)
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    scan = np.where(((xx - 0.5) / 0.46) ** 2 + ((yy - 0.5) / 0.42) ** 2 < 1, 0.45, 0.03)
    scan = np.where(np.hypot(xx - 0.33, yy - 0.35) < 0.09, 0.95, scan)
    ax.imshow(scan, cmap="gray", extent=(0.2, 1.5, 3.4, 4.7), vmin=0, vmax=1)
    ax.text(0.85, 3.2, "image\n224 x 224", ha="center", va="top", fontsize=9)

    _box(ax, 1.95, 3.45, 1.9, 1.2, "BiomedCLIP\nViT-B/16\nclass token", TRAINED, fontsize=9)
    _box(ax, 4.55, 3.45, 2.35, 1.2, "projector\nLinear 512 -> 4096\nGELU\nLinear 4096 -> 4096 N", TRAINED, fontsize=8.5)
    _arrow(ax, 1.55, 4.05, 1.95, 4.05)
    _arrow(ax, 3.85, 4.05, 4.55, 4.05, "[b, 512]")

    # the soft tokens
    n_draw = 10
    for i in range(n_draw):
        _box(ax, 7.45 + i * 0.23, 3.85, 0.18, 0.4, "", SOFT, style="square,pad=0")
    ax.text(7.45 + n_draw * 0.23 / 2, 4.45, f"N = {num_image_tokens} soft image tokens [b, N, 4096]",
            ha="center", fontsize=9)
    _arrow(ax, 6.9, 4.05, 7.4, 4.05)

    # the prompt with placeholders
    y = 1.75
    ax.text(0.2, y + 0.75, "prompt (Llama 3 chat template)", fontsize=9)
    tokens = [("<|begin_of_text|>\nuser header", TEXT, 1.7)]
    tokens += [("①", "#F2C14E", 0.25)] * n_draw
    tokens += [("<|eot_id|>", TEXT, 1.0), ("assistant\nheader", TEXT, 1.1), ("caption ...", "#DDDDDD", 1.2)]
    x = 0.2
    placeholder_x = []
    for label, color, w in tokens:
        _box(ax, x, y, w - 0.04, 0.5, label, color, text_color="black", fontsize=7.5, style="square,pad=0")
        if label == "①":
            placeholder_x.append(x + w / 2)
        x += w
    ax.text(placeholder_x[0] - 0.1, y - 0.3, f"{num_image_tokens} placeholders", fontsize=8, ha="left")
    # the splice: soft tokens replace the placeholders' embeddings
    _arrow(ax, 7.45 + n_draw * 0.23 / 2, 3.8, placeholder_x[len(placeholder_x) // 2], y + 0.55,
           connectionstyle="arc3,rad=0.15")
    ax.text(11.15, 3.05, "the soft tokens replace the\nplaceholders' embeddings\n(EarlyFusionModel, count checked)",
            fontsize=8, ha="center", color="#333333")

    _box(ax, 9.6, 1.45, 3.1, 1.1, "Llama-3.1-8B-Instruct\n(frozen)", FROZEN, fontsize=11)
    _arrow(ax, x + 0.02, y + 0.25, 9.6, 2.0)
    _box(ax, 9.6, 0.25, 3.1, 0.75, "caption / answer text", TEXT, text_color="black", fontsize=10)
    _arrow(ax, 11.15, 1.45, 11.15, 1.0)

    ax.text(0.2, 0.55, "trained: vision tower + projector", color=TRAINED, fontsize=10, weight="bold")
    ax.text(0.2, 0.2, "frozen: the LLM (its language ability is kept, not overfitted)", color=FROZEN, fontsize=10,
            weight="bold")
    ax.set_title("medcap: a frozen LLM learns to see through a trained vision encoder", fontsize=13)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "diagram.png"))
    p.add_argument("--num-image-tokens", type=int, default=50)
    args = p.parse_args(argv)
    print(draw(Path(args.out), args.num_image_tokens))
    return 0


if __name__ == "__main__":
    try:
        from medcap.cli import quiet_broken_pipe
    except ImportError:  # this script also runs without medcap installed
        raise SystemExit(main())
    raise SystemExit(quiet_broken_pipe(main))
