"""Two small torch models for issue 16 (embeddings and recurrent layers), exported to ONNX.

Used by tests/test_layers16.py and benchmarks/layers16.py. Weights are seeded, not trained.

- ``encoder``: a BERT-like sentence encoder (word and position embeddings, two pre-norm attention blocks,
  mean pooling): the word embedding holds about half of the parameters.
- ``speech``: a speech-style recognizer on 40 filterbank features per frame: a linear front end, a
  bidirectional LSTM, a GRU and a per-frame classifier: the recurrent layers hold most of the compute.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

__all__ = ["ENCODER", "SPEECH", "export", "token_ids"]

ENCODER = {"vocab": 2000, "width": 64, "seq": 16}
SPEECH = {"features": 40, "hidden": 64, "frames": 50, "classes": 30}


def _encoder(torch):
    nn = torch.nn
    width, heads = ENCODER["width"], 4

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.out = nn.Linear(width, width)
            self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

        def forward(self, h):
            batch, seq, _ = h.shape
            q, k, v = self.qkv(self.norm1(h)).reshape(batch, seq, 3, heads, -1).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-1, -2) / (width // heads) ** 0.5).softmax(-1)
            h = h + self.out((attn @ v).transpose(1, 2).reshape(batch, seq, width))
            return h + self.ffn(self.norm2(h))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(ENCODER["vocab"], width)
            self.positions = nn.Embedding(ENCODER["seq"], width)
            self.blocks = nn.Sequential(Block(), Block())
            self.norm = nn.LayerNorm(width)

        def forward(self, input_ids):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            h = self.blocks(self.words(input_ids) + self.positions(positions))
            return self.norm(h).mean(1)

    return Encoder()


def _speech(torch):
    nn = torch.nn
    hidden = SPEECH["hidden"]

    class Speech(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = nn.Linear(SPEECH["features"], hidden)
            self.lstm = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
            self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
            self.classify = nn.Linear(hidden, SPEECH["classes"])

        def forward(self, x):
            h, _ = self.lstm(torch.relu(self.front(x)))
            h, _ = self.gru(h)
            return self.classify(h)

    return Speech()


def token_ids(count: int, seed: int = 0) -> np.ndarray:
    """[count, seq] ids drawn from a Zipf law (rank-frequency as in text): a few tokens are most of them."""
    rng = np.random.default_rng(seed)
    vocab = ENCODER["vocab"]
    weights = 1.0 / np.arange(1, vocab + 1)
    order = rng.permutation(vocab)  # frequent tokens are not the first rows of the table
    return order[rng.choice(vocab, size=(count, ENCODER["seq"]), p=weights / weights.sum())].astype(np.int64)


def features(count: int, seed: int = 0) -> np.ndarray:
    """[count, frames, features] smooth random filterbank-like inputs."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((count, SPEECH["frames"] + 4, SPEECH["features"]))
    return (raw[:, :-4] + raw[:, 1:-3] + raw[:, 2:-2] + raw[:, 3:-1] + raw[:, 4:]).astype(np.float32) / 2


def export(torch, name: str, path: Path) -> Path:
    """Export the seeded ``encoder`` or ``speech`` model (TorchScript exporter, opset 17, dynamic batch)."""
    torch.manual_seed(0)
    net = (_encoder if name == "encoder" else _speech)(torch).eval()
    if name == "encoder":
        example, input_name = torch.from_numpy(token_ids(2)), "input_ids"
    else:
        example, input_name = torch.from_numpy(features(2)), "x"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["y"],
            dynamic_axes={input_name: {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path
