"""``--heatmap``: the token-level attention matrix as a picture, token labels on both axes (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from attention_pb.v1 import attention_pb2 as pb
from client.picture_files import writing
from client.render import matrix


def draw(result: pb.Translation, hypothesis: pb.Hypothesis, path: Path, title: str = "") -> None:
    """Rows: target tokens (EOS included); columns: source tokens (EOS included)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # matplotlib is optional for the server-side install
        raise SystemExit(f"attn: --heatmap needs matplotlib ({exc}); pip install matplotlib") from exc
    weights = matrix(hypothesis.attention)
    sources = [t.piece for t in result.source_tokens]
    targets = [t.piece for t in hypothesis.tokens]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(sources) + 2), max(3.0, 0.4 * len(targets) + 1.5)))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(sources)), sources, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(len(targets)), targets, fontsize=9)
    ax.set_xlabel("source tokens")
    ax.set_ylabel("target tokens")
    ax.set_title(title or hypothesis.text, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, label="attention")
    fig.tight_layout()
    try:
        with writing(path) as picture_format:
            fig.savefig(path, dpi=120, format=picture_format)
    finally:
        plt.close(fig)
