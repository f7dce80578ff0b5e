"""A zoo of small models as people export them: torch architectures and converter-style graphs.

Torch networks are written here (torchvision is not usable with the pinned torch) with seeded weights and
non-trivial BatchNorm statistics, and exported by `export` with the TorchScript exporter (opsets 11/13/17,
with and without constant folding) or the dynamo exporter. `converter_models` builds graphs with
`onnx.helper` the way other converters write them (tf2onnx's NHWC Transposes, Constant-node weights,
Identity-chained weights, IR 3 with initializers listed as inputs).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ARCHS", "Arch", "converter_models", "export"]

VOCAB, SEQ, WIDTH = 50, 6, 32
HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Arch:
    """A torch network and how it is called: example inputs, names, and which axes are dynamic."""

    build: Callable  # torch -> nn.Module
    inputs: Callable  # torch -> tuple of example tensors
    input_names: tuple[str, ...] = ("x",)
    output_names: tuple[str, ...] = ("y",)
    dynamic: dict[str, dict[int, str]] = field(default_factory=lambda: {"x": {0: "batch"}, "y": {0: "batch"}})
    dtype: str = "float32"


def _randomize_bn(torch, net) -> None:
    """Trained-looking BN statistics, so that folding them is visible in the outputs."""
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)


def _conv_bn(torch, cin, cout, k=3, stride=1, groups=1, relu6=True, dims=2, dilation=1):
    nn = torch.nn
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    pad = dilation * (k // 2)
    layers = [conv(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False), bn(cout)]
    return nn.Sequential(*layers, nn.ReLU6() if relu6 else nn.ReLU())


def _mobilenet(torch):
    nn = torch.nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.residual = stride == 1 and cin == cout
            self.block = nn.Sequential(
                _conv_bn(torch, cin, hidden, k=1),
                _conv_bn(torch, hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                _conv_bn(torch, 3, 16, stride=2),
                InvertedResidual(16, 16, 1, 4),
                InvertedResidual(16, 24, 2, 4),
                InvertedResidual(24, 24, 1, 4),
                _conv_bn(torch, 24, 64, k=1),
            )
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

        def forward(self, x):
            x = self.features(x)
            return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    return MobileNetV2()


def _resnet(torch, groups: int = 1, dilation: int = 1):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            width = cout if groups == 1 else 2 * cout
            self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, cout, 3, 1, dilation, dilation=dilation, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layer1 = Block(16, 16, 1)
            self.layer2 = Block(16, 32, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    return ResNet()


def _bert(torch):
    nn = torch.nn

    class TinyBert(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.position = nn.Parameter(torch.randn(1, 16, WIDTH) * 0.1)
            layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(WIDTH)
            self.pooler = nn.Linear(WIDTH, WIDTH)

        def forward(self, ids):
            h = self.embed(ids) + self.position[:, : ids.shape[1]]
            h = self.norm(self.encoder(h))
            logits = h @ self.embed.weight.T  # tied output projection
            return logits, torch.tanh(self.pooler(h[:, 0]))

    return TinyBert()


def _hf_bert(torch):
    """BERT as Hugging Face writes it: separate Q/K/V Linear on 3-D inputs, additive mask, GELU (Erf),
    token types, and an MLM head whose decoder is tied to the word embeddings."""
    nn = torch.nn
    heads, width = 4, WIDTH

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
            self.attn_out = nn.Linear(width, width)
            self.attn_norm = nn.LayerNorm(width, eps=1e-12)
            self.intermediate = nn.Linear(width, 2 * width)
            self.output = nn.Linear(2 * width, width)
            self.out_norm = nn.LayerNorm(width, eps=1e-12)

        def split(self, x):
            batch, seq = x.shape[0], x.shape[1]
            return x.view(batch, seq, heads, width // heads).permute(0, 2, 1, 3)

        def forward(self, h, mask):
            q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
            scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5 + mask
            context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(h.shape)
            h = self.attn_norm(h + self.attn_out(context))
            return self.out_norm(h + self.output(nn.functional.gelu(self.intermediate(h))))

    class HfBert(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(VOCAB, width)
            self.positions = nn.Embedding(16, width)
            self.token_types = nn.Embedding(2, width)
            self.norm = nn.LayerNorm(width, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(2))
            self.transform = nn.Linear(width, width)
            self.decoder = nn.Linear(width, VOCAB)
            self.decoder.weight = self.words.weight

        def forward(self, input_ids, attention_mask, token_type_ids):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            h = self.words(input_ids) + self.positions(positions) + self.token_types(token_type_ids)
            h = self.norm(h)
            mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
            for layer in self.layers:
                h = layer(h, mask)
            return self.decoder(nn.functional.gelu(self.transform(h)))

    return HfBert()


def _audio(torch):
    nn = torch.nn
    return nn.Sequential(
        _conv_bn(torch, 1, 16, k=9, stride=2, relu6=False, dims=1),
        _conv_bn(torch, 16, 32, k=5, relu6=False, dims=1, dilation=2),
        _conv_bn(torch, 32, 32, k=3, relu6=False, dims=1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 8),
    )


def _unet(torch):
    nn = torch.nn

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down1 = _conv_bn(torch, 3, 16, relu6=False)
            self.down2 = _conv_bn(torch, 16, 32, stride=2, relu6=False)
            self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
            self.up_bn = nn.BatchNorm2d(16)
            self.up_grouped = nn.ConvTranspose2d(32, 16, 3, stride=1, padding=1, groups=2, bias=False)
            self.up_grouped_bn = nn.BatchNorm2d(16)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            skip = self.down1(x)
            up = torch.relu(self.up_bn(self.up(self.down2(skip))))
            merged = torch.cat([up, skip], 1)
            return self.head(torch.relu(self.up_grouped_bn(self.up_grouped(merged))))

    return UNet()


def _conv3d(torch):
    nn = torch.nn
    return nn.Sequential(
        _conv_bn(torch, 2, 8, relu6=False, dims=3),
        _conv_bn(torch, 8, 16, stride=2, relu6=False, dims=3),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _mlp(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(20, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 48, bias=False),
        nn.BatchNorm1d(48),
        nn.ReLU(),
        nn.Linear(48, 10),
    )


def _rnn(torch):
    nn = torch.nn

    class RnnHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 24)
            self.lstm = nn.LSTM(24, 32, batch_first=True)
            self.gru = nn.GRU(32, 32, batch_first=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            h, _ = self.lstm(torch.relu(self.proj(x)))
            h, _ = self.gru(h)
            return self.head(h[:, -1])

    return RnnHead()


def _branchy(torch):
    """A scripted branch on a data-dependent condition: an If node whose branches read the weights."""
    nn = torch.nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 32)
            self.left = nn.Linear(32, 8)
            self.right = nn.Linear(32, 8)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            if bool(h.sum() > 0):
                return self.left(h)
            return self.right(h) * 2.0

    return torch.jit.script(Branchy())


def _image(shape):
    return lambda torch: (torch.randn(*shape),)


def _ids(torch):
    return (torch.randint(0, VOCAB, (2, SEQ)),)


def _hf_inputs(torch):
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    mask[1, SEQ - 2 :] = 0
    return torch.randint(0, VOCAB, (2, SEQ)), mask, torch.randint(0, 2, (2, SEQ))


ARCHS: dict[str, Arch] = {
    "mobilenetv2": Arch(_mobilenet, _image((2, 3, 32, 32))),
    "resnet": Arch(_resnet, _image((2, 3, 16, 16))),
    "resnext": Arch(lambda torch: _resnet(torch, groups=4), _image((2, 3, 16, 16))),
    "dilated": Arch(lambda torch: _resnet(torch, dilation=2), _image((2, 3, 16, 16))),
    "bert": Arch(
        _bert,
        _ids,
        input_names=("input_ids",),
        output_names=("logits", "pooled"),
        dynamic={
            "input_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
            "pooled": {0: "batch"},
        },
    ),
    "hf_bert": Arch(
        _hf_bert,
        _hf_inputs,
        input_names=HF_INPUTS,
        output_names=("logits",),
        dynamic={
            **{name: {0: "batch", 1: "sequence"} for name in HF_INPUTS},
            "logits": {0: "batch", 1: "sequence"},
        },
    ),
    "audio": Arch(_audio, _image((2, 1, 64))),
    "unet": Arch(_unet, _image((2, 3, 16, 16)), dynamic={"x": {0: "batch"}, "y": {0: "batch"}}),
    "conv3d": Arch(_conv3d, _image((2, 2, 8, 8, 8))),
    "mlp": Arch(_mlp, _image((4, 20))),
    "rnn": Arch(_rnn, _image((2, 7, 12))),
    "resnet_fp16": Arch(_resnet, _image((2, 3, 16, 16)), dtype="float16"),
    "branchy": Arch(_branchy, _image((2, 16))),
}


def build(torch, name: str):
    """The seeded network in eval mode and its example inputs."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    net = arch.build(torch)
    _randomize_bn(torch, net)
    net.eval()
    inputs = arch.inputs(torch)
    if arch.dtype == "float16":
        net = net.half()
        inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    return net, inputs


def export(
    torch, name: str, path: Path, *, dynamo: bool = False, opset: int = 17, folding: bool = True
) -> dict[str, np.ndarray]:
    """Export ``name`` to ``path``; returns the example feeds."""
    arch = ARCHS[name]
    net, inputs = build(torch, name)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {
                input_name: {axis: torch.export.Dim.AUTO for axis in arch.dynamic.get(input_name, {})}
                for input_name in arch.input_names
            }
            program = torch.onnx.export(
                net,
                inputs,
                dynamo=True,
                input_names=list(arch.input_names),
                output_names=list(arch.output_names),
                dynamic_shapes=tuple(dims.values()),
            )
            program.save(str(path))
        else:
            torch.onnx.export(
                net,
                inputs,
                str(path),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=folding,
                input_names=list(arch.input_names),
                output_names=list(arch.output_names),
                dynamic_axes=arch.dynamic,
            )
    return {n: t.numpy() for n, t in zip(arch.input_names, inputs, strict=True)}


# --- Graphs as other converters write them ----------------------------------------------------------------


def _bn_params(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_beta": rng.uniform(-0.5, 0.5, channels).astype(np.float32),
        f"{prefix}_mean": rng.uniform(-0.5, 0.5, channels).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    }


def _bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=f"{prefix}", epsilon=1e-3)


def _model(nodes, inputs, outputs, weights, *, opset=13, ir_version=7, producer="tf2onnx"):
    graph = helper.make_graph(
        nodes,
        "converted",
        inputs,
        outputs,
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    model.producer_name = producer
    model.metadata_props.add(key="labels", value="a,b,c,d,e")
    return model


def tf2onnx_nhwc(rng: np.random.Generator) -> onnx.ModelProto:
    """tf2onnx: NHWC input, Transpose to NCHW around each Conv, fused BN left by Keras, MatMul+Add dense."""
    weights = {
        "conv1/kernel": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "conv2/kernel": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2,
        "dense/kernel": rng.standard_normal((16, 6)).astype(np.float32) * 0.3,
        "dense/bias": rng.standard_normal(6).astype(np.float32),
        "shape": np.array([-1, 16], dtype=np.int64),
        **_bn_params(rng, "bn1", 8),
        **_bn_params(rng, "bn2", 16),
    }
    nodes = [
        helper.make_node("Transpose", ["input:0"], ["t0"], name="conv1__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", "conv1/kernel"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        _bn("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="Relu"),
        helper.make_node("Conv", ["r1", "conv2/kernel"], ["c2"], name="conv2", strides=[2, 2]),
        _bn("bn2", "c2", "b2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="Relu_1"),
        helper.make_node("Transpose", ["r2"], ["t2"], name="conv2__10", perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["t2"], ["pooled"], name="gap", axes=[1, 2], keepdims=0),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense/bias"], ["logits"], name="dense/BiasAdd"),
        helper.make_node("Softmax", ["logits"], ["probs:0"], name="softmax", axis=-1),
    ]
    inputs = [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, ["unk__1", 12, 12, 3])]
    outputs = [helper.make_tensor_value_info("probs:0", TensorProto.FLOAT, ["unk__2", 6])]
    return _model(nodes, inputs, outputs, weights)


def constant_node_weights(rng: np.random.Generator) -> onnx.ModelProto:
    """Every weight in a Constant node (as some converters and `onnx.compose` write), nodes unnamed."""
    model = tf2onnx_nhwc(rng)
    constants = [
        helper.make_node("Constant", [], [t.name], value=t)
        for t in model.graph.initializer
        if t.name != "shape"
    ]
    del model.graph.initializer[:]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "shape"))
    nodes = constants + list(model.graph.node)
    for node in nodes:
        node.name = ""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def identity_chained_weights(rng: np.random.Generator) -> onnx.ModelProto:
    """Weights reached through Identity chains (TF's ReadVariableOp), one weight shared by two MatMuls."""
    weights = {
        "w_shared": rng.standard_normal((24, 24)).astype(np.float32) * 0.2,
        "w_in": rng.standard_normal((10, 24)).astype(np.float32) * 0.3,
        "b_in": rng.standard_normal(24).astype(np.float32),
    }
    nodes = [
        helper.make_node("Identity", ["w_in"], ["w_in/read"], name="w_in/read"),
        helper.make_node("Identity", ["w_in/read"], ["w_in/read/1"], name="w_in/read/1"),
        helper.make_node("Identity", ["w_shared"], ["w_shared/read"], name="w_shared/read"),
        helper.make_node("MatMul", ["x", "w_in/read/1"], ["h0"], name="dense_in"),
        helper.make_node("Add", ["h0", "b_in"], ["h1"], name="dense_in/bias"),
        helper.make_node("Tanh", ["h1"], ["h2"], name="tanh"),
        helper.make_node("MatMul", ["h2", "w_shared/read"], ["h3"], name="shared_a"),
        helper.make_node("Relu", ["h3"], ["h4"], name="relu"),
        helper.make_node("MatMul", ["h4", "w_shared/read"], ["y"], name="shared_b"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])]
    return _model(nodes, inputs, outputs, weights, producer="keras2onnx")


def ir3_initializers_as_inputs(rng: np.random.Generator) -> onnx.ModelProto:
    """IR 3 / opset 11 (old exporters): every initializer is also listed as a graph input."""
    weights = {
        "conv.weight": rng.standard_normal((12, 3, 3, 3)).astype(np.float32) * 0.3,
        "conv.bias": rng.standard_normal(12).astype(np.float32),
        "fc.weight": rng.standard_normal((5, 12 * 6 * 6)).astype(np.float32) * 0.05,
        "fc.bias": rng.standard_normal(5).astype(np.float32),
        **_bn_params(rng, "bn", 12),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv.weight", "conv.bias"], ["c"], name="", pads=[1, 1, 1, 1]),
        _bn("bn", "c", "b"),
        helper.make_node("Relu", ["b"], ["r"], name=""),
        helper.make_node("MaxPool", ["r"], ["p"], name="", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name=""),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["out"], name="", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 12, 12])]
    inputs += [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in weights.items()
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])]
    return _model(nodes, inputs, outputs, weights, opset=11, ir_version=3, producer="pytorch")


def converter_models(rng: np.random.Generator) -> dict[str, onnx.ModelProto]:
    return {
        "tf2onnx_nhwc": tf2onnx_nhwc(rng),
        "constant_nodes": constant_node_weights(rng),
        "identity_chains": identity_chained_weights(rng),
        "ir3_inputs": ir3_initializers_as_inputs(rng),
    }
