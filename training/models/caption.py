"""Show, Attend and Tell (Xu et al. 2015) with soft attention.

Encoder: a CNN whose last feature map is read as a grid of annotation vectors ``a_i`` (one per cell, row-major). By
default a small residual CNN trained from scratch, with two coordinate channels added to the input (CoordConv) so
that an annotation knows where in the image it is — the decoder needs that for "left of" and "above". A torchvision
ResNet can replace it (``backbone="torchvision:resnet18"``) when torchvision is installed; it is never required.

Decoder: an LSTM. At step t the soft attention ``α_t = softmax_i(v · tanh(W h_{t-1} + U a_i))`` (additive, the
project's :class:`BahdanauAttention`) gives the context ``ẑ_t = β_t Σ_i α_ti a_i``, gated by the scalar
``β_t = σ(f_β(h_{t-1}))``; then ``h_t, c_t = LSTM([E y_{t-1}; ẑ_t], h_{t-1}, c_{t-1})`` and the deep output
``p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z ẑ_t))``. The initial state is ``tanh(f_init(mean_i a_i))`` as in the
paper, or (``init_state="learned"``) a learned constant.

Both are the paper's model by default. The bundled scenes captioner turns one of them off (``lstm_reads_context=False``;
its initial state is the paper's, from the mean annotation): then a word cannot be said from what an earlier glance
left in the LSTM's memory, and each object word attends to its object. ``init_state="learned"`` also keeps the image out
of the initial state (tried on the scenes: no better). With the paper's wiring the model looks at an object once (at
its colour) and spends the other words' attention elsewhere (docs/captioning.md has the numbers).

The attention of step t is the one that produced word y_t. :meth:`ShowAttendTell.step` is the only decoding step:
training (through :meth:`ShowAttendTell.forward`), greedy evaluation and the ONNX export all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.models.attention import BahdanauAttention

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ShowAttendTellConfig:
    vocab_size: int
    image_size: int = 96
    backbone: str = "resnet-small"  # or "torchvision:resnet18" / "torchvision:resnet34" (needs torchvision)
    width: int = 16  # channels of the small CNN's stem; doubled at every downsampling
    stages: int = 3  # stride-2 stages of the small CNN: the grid is image_size / 2**stages cells a side
    extra_blocks: int = 1  # stride-1 residual blocks after the last stage (each widens the receptive field)
    feature_dim: int = 128  # D, the size of an annotation vector
    emb_dim: int = 64
    hidden_dim: int = 256
    attn_dim: int = 128
    dropout: float = 0.2
    # The probability that, in training, the LSTM does not read a step's context (the output layer still does), so
    # that an earlier glance is not reliably remembered and words look again (tried on the scenes: no better).
    context_dropout: float = 0.0
    # False: the LSTM reads only the previous word and the context goes to the output layer alone (as in Luong et
    # al.'s attention without input feeding): nothing of a glance is remembered, every word must look for itself.
    lstm_reads_context: bool = True
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    attention: str = "soft"
    init_state: str = "mean"  # h_0, c_0 from the mean annotation (the paper), or "learned": the same for every image


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (batch, H, W, 3) -> float (batch, 3, H, W), scaled to [0, 1] and standardised per channel."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A stride-2 stem, then ``stages - 1`` residual blocks of stride 2 (doubling the channels) and ``extra_blocks``
    of stride 1.

    The first convolution works at half resolution: on a 2-core CPU a full-resolution stem costs more than all the
    rest of the model, and the objects it has to find are 18 px and larger.
    """

    def __init__(self, cfg: ShowAttendTellConfig) -> None:
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3 + 2, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks: list[nn.Module] = []
        channels = w
        for _ in range(cfg.stages - 1):
            blocks.append(ResidualBlock(channels, 2 * channels, 2))
            channels *= 2
        blocks += [ResidualBlock(channels, channels, 1) for _ in range(cfg.extra_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1.0, 1.0, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.blocks(self.stem(torch.cat([images, ys, xs], dim=1)))


def _torchvision_backbone(name: str) -> tuple[nn.Module, int]:
    try:
        import torchvision  # noqa: F401
        from torchvision import models
    except ImportError as exc:
        raise ValueError(f"backbone {name!r} needs torchvision, which is not installed") from exc
    arch = name.split(":", 1)[1]
    net = getattr(models, arch)(weights=None)
    # Up to layer3 (stride 16): a finer grid than layer4 for the small images this project uses.
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    return body, net.layer3[-1].conv1.in_channels


class ShowAttendTell(nn.Module):
    def __init__(self, cfg: ShowAttendTellConfig) -> None:
        super().__init__()
        if cfg.attention != "soft":
            raise ValueError(f"unknown attention {cfg.attention!r}")
        if not 0.0 <= cfg.context_dropout < 1.0:
            raise ValueError(f"context_dropout {cfg.context_dropout} must be in [0, 1)")
        self.cfg = cfg
        if cfg.backbone == "resnet-small":
            cnn = SmallResNet(cfg)
            self.cnn: nn.Module = cnn
            channels = cnn.out_channels
        elif cfg.backbone.startswith("torchvision:"):
            self.cnn, channels = _torchvision_backbone(cfg.backbone)
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}")
        D, H, E = cfg.feature_dim, cfg.hidden_dim, cfg.emb_dim
        self.project = nn.Conv2d(channels, D, 1)
        self.embedding = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_id)
        if cfg.init_state == "mean":
            self.init_h = nn.Linear(D, H)
            self.init_c = nn.Linear(D, H)
        elif cfg.init_state == "learned":
            # Without a summary of the image in the initial state, the decoder can see the image only through
            # attention: every word has to look at something.
            self.h0 = nn.Parameter(torch.zeros(H))
            self.c0 = nn.Parameter(torch.zeros(H))
        else:
            raise ValueError(f"unknown init_state {cfg.init_state!r}")
        self.attention = BahdanauAttention(H, D, cfg.attn_dim)
        self.f_beta = nn.Linear(H, 1)
        self.cell = nn.LSTMCell(E + D if cfg.lstm_reads_context else E, H)
        self.L_h = nn.Linear(H, E)
        self.L_z = nn.Linear(D, E)
        self.L_o = nn.Linear(E, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the annotation grid for this model's input size."""
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size)
            was_training = self.training
            self.eval()
            shape = self.project(self.cnn(probe)).shape[-2:]
            self.train(was_training)
        return int(shape[0]), int(shape[1])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """images: (batch, 3, S, S) normalised.

        Returns the annotations (batch, cells, D), their projected keys ``U a_i`` (batch, cells, attn) and the
        initial state h_0, c_0 (batch, H) each.
        """
        grid = self.project(self.cnn(images))  # (batch, D, rows, cols)
        features = grid.flatten(2).transpose(1, 2)  # (batch, cells, D), row-major
        keys = self.attention.project_keys(features)
        if self.cfg.init_state == "learned":
            batch = features.size(0)
            return features, keys, torch.tanh(self.h0).expand(batch, -1), torch.tanh(self.c0).expand(batch, -1)
        mean = features.mean(1)
        return features, keys, torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def step(
        self,
        prev_token: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        features: torch.Tensor,
        keys: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder step.

        prev_token: (batch,) y_{t-1}; h, c: (batch, H). Returns logits (batch, vocab), h_t, c_t and the attention
        α_t (batch, cells) over the grid, each row summing to 1.
        """
        embedded = self.embedding(prev_token)  # (batch, E)
        every_cell = torch.ones_like(keys[:, :, 0], dtype=torch.bool)  # a grid has no padding
        context, weights = self.attention(h, keys, features, every_cell)
        context = torch.sigmoid(self.f_beta(h)) * context  # β_t gates how much of the image the word uses
        inputs = [self.dropout(embedded)]
        if self.cfg.lstm_reads_context:
            read = context
            if self.training and self.cfg.context_dropout > 0:
                keep = torch.rand(context.size(0), 1, device=context.device) >= self.cfg.context_dropout
                read = context * keep / (1.0 - self.cfg.context_dropout)  # (batch, D): whole glances dropped
            inputs.append(read)
        h, c = self.cell(torch.cat(inputs, dim=-1), (h, c))
        logits = self.L_o(self.dropout(embedded + self.L_h(h) + self.L_z(context)))
        return logits, h, c, weights

    def forward(self, images: torch.Tensor, tgt_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding: logits (batch, tgt_len, vocab) and attention (batch, tgt_len, cells)."""
        features, keys, h, c = self.encode(images)
        all_logits, all_weights = [], []
        for t in range(tgt_in.size(1)):
            logits, h, c, weights = self.step(tgt_in[:, t], h, c, features, keys)
            all_logits.append(logits)
            all_weights.append(weights)
        return torch.stack(all_logits, 1), torch.stack(all_weights, 1)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy captions of a batch: each caption's tokens (without EOS) and attention rows.

        A caption's attention has one row per emitted token including the final EOS, as the server returns it.
        """
        features, keys, h, c = self.encode(images)
        batch = images.size(0)
        token = torch.full((batch,), self.cfg.bos_id, dtype=torch.long, device=images.device)
        done = torch.zeros(batch, dtype=torch.bool, device=images.device)
        steps, step_weights = [], []
        for _ in range(max_len):
            logits, h, c, weights = self.step(token, h, c, features, keys)
            token = logits.argmax(-1)
            steps.append(token)
            step_weights.append(weights)
            done |= token == self.cfg.eos_id
            if bool(done.all()):
                break
        all_tokens = torch.stack(steps, 1).tolist()  # (batch, steps)
        all_weights = torch.stack(step_weights, 1)  # (batch, steps, cells)
        tokens, rows = [], []
        for b, seq in enumerate(all_tokens):
            n = seq.index(self.cfg.eos_id) if self.cfg.eos_id in seq else len(seq)
            tokens.append(seq[:n])
            rows.append(all_weights[b, : min(n + 1, len(seq))])
        return tokens, rows


def doubly_stochastic_penalty(attention: torch.Tensor, step_mask: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ · Σ_i (1 − Σ_t α_ti)²`` per image, averaged over the batch (Xu et al. 2015, eq. 14).

    attention: (batch, steps, cells); step_mask: (batch, steps), true on the steps of real (non-padding) tokens.
    Pushes every cell to receive, over the whole caption, about as much attention as any other.
    """
    per_cell = (attention * step_mask.unsqueeze(-1).to(attention.dtype)).sum(1)  # (batch, cells)
    return lam * ((1.0 - per_cell) ** 2).sum(1).mean()
