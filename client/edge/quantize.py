"""Quantised variants of the fp32 export: int8, q4 and q4f16, all as MatMulNBits (GPTQ codes).

Every linear layer becomes onnxruntime's MatMulNBits (8 or 4 bits, symmetric blocks along
the input), with codes from GPTQ on the run's training texts (:mod:`gptq`): it keeps the
quantised model's outputs near the merged model's on that kind of text, adapter included.

The tied embedding / LM head matrix is a fifth of SmolLM2's weights. optimum exports it
as one fp32 initializer read twice: by a Gather (the embedding) and through a Transpose
by the head's MatMul. The stock quantisers skip both (a Gather is not a MatMul, and the
head's weight is not an initializer), which would leave the int8 file at ~0.4 of fp32.
:func:`quantize_tied_embedding` quantises that matrix once, blockwise, and lets
``GatherBlockQuantized`` and ``MatMulNBits`` read the same bytes: both take rows of the
[vocab, hidden] matrix, blocks along hidden, packed low nibble first, with an implicit
zero point of 2^(bits-1) when none is given.

The embedding side is written in standard ops (Gather of the packed rows and their scales,
then unpack, subtract the zero point, scale): onnxruntime-web's wasm build has no
``GatherBlockQuantized`` kernel, and dequantising only the gathered rows costs nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from fedswarm.client.edge.gptq import QuantizedLinear

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
EIGHT_BIT_BLOCK = 64  # block of the layers a 4-bit recipe keeps at 8 bits
SMALLEST_HALF = 2.0**-24  # the smallest float16 subnormal: a block scale never rounds below it (nor to 0)


@dataclass(frozen=True)
class Recipe:
    """How one variant is quantised: weight-only, blockwise along the input, symmetric."""

    bits: int  # MatMulNBits bits of the decoder's linear layers
    block: int  # along the input dimension
    embed_bits: int  # the shared embedding / tied head
    embed_block: int
    accuracy_level: int  # 4: activations quantised to int8 per block on the fly (x86's fast path); 0: float compute
    method: str = "rtn"  # "rtn": round-to-nearest; "gptq": calibrated codes (see gptq.py)
    eight_bit_layers: tuple[str, ...] = ()  # name fragments kept at 8 bits in a 4-bit model
    fp16: bool = False  # then weights, scales and compute in fp16, graph inputs/outputs kept float32

    def layer_plan(self, name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(bits, block) for the linear layer ``name`` of weight shape [out, in]; None where no block fits."""
        eight = self.bits != 8 and any(part in name for part in self.eight_bit_layers)
        bits, block = (8, EIGHT_BIT_BLOCK) if eight else (self.bits, self.block)
        if name.split(".")[-1] == "lm_head":  # tied to the embedding: quantised as the embedding is
            bits, block = self.embed_bits, self.embed_block
        block = fitting_block(shape[1], block)
        return (bits, block) if block else None


# recipe -> GPTQ codes and scales of the PyTorch model's linear layers (module name -> QuantizedLinear)
Calibrate = Callable[[Recipe], "dict[str, QuantizedLinear]"]


# Measured on SmolLM2-135M + a trained adapter (next-token agreement with the merged PyTorch model
# over distinct held-out positions, 64 texts / 1351 positions; +-0.006):
# - int8: onnxruntime's quantize_dynamic (int8 weights, uint8 activations per tensor) 0.67 on the
#   base model, as activation outliers swamp a per-tensor range. MatMulNBits 8-bit weights in blocks
#   of 64 with per-block int8 activations (accuracy level 4, ~3x faster than PyTorch eager):
#   round-to-nearest 0.956, GPTQ (head included) 0.965. With float32 block scales the file was 0.268
#   of fp32; scales stored as float16 (:func:`half_scales`) bring it to 0.2599 at the same agreement.
#   Blocks of 256 (+ a 64 tail) instead cost 3 points (0.935): the activations are quantised per
#   block too. Float compute (accuracy level 0/1) keeps them but is ~25x slower for 8 bits on x86.
# - q4 (4-bit blocks of 32, v_proj and down_proj at 8 bits as llama.cpp's Q4_K_M keeps them higher):
#   round-to-nearest 0.83, GPTQ 0.92 (perplexity change -39% -> -1%: RTN erased much of the
#   adapter). All layers at 4 bits with GPTQ: 0.89 at 0.18 of fp32. HQQ 4-bit reached 0.98 on the
#   base model but 0.17 with a trained adapter (it pulls the adapter's small delta back to the
#   base model's grid) and its float zero points take a 30x slower path in onnxruntime's CPU kernels.
# - the tied embedding/head writes the logits: at 4 bits it alone costs ~0.2 of agreement, so it stays at 8.
_Q4 = Recipe(
    bits=4,
    block=32,
    embed_bits=8,
    embed_block=64,
    accuracy_level=4,
    method="gptq",
    eight_bit_layers=("v_proj", "down_proj"),
)
RECIPES = {
    "int8": Recipe(bits=8, block=64, embed_bits=8, embed_block=64, accuracy_level=4, method="gptq"),
    "q4": _Q4,
    "q4f16": dataclasses.replace(_Q4, fp16=True),
}


def describe(variant: str) -> str:
    """One line on how ``variant`` is quantised, for the model card and parity.json."""
    r = RECIPES[variant]
    text = f"{r.bits}-bit weights in blocks of {r.block}"
    if r.eight_bit_layers and r.bits != 8:
        text += f" ({', '.join(r.eight_bit_layers)} at 8 bits)"
    text += f", tied embedding/head {r.embed_bits}-bit in blocks of {r.embed_block}"
    text += ", GPTQ codes" if r.method == "gptq" else ", rounded to nearest"
    return text + (", fp16 compute" if r.fp16 else ", float16 block scales")


def quantize_variant(
    variant: str, fp32: Path, target: Path, done: dict[str, Path] | None = None, calibrate: Calibrate | None = None
) -> Path:
    """Write ``variant`` of the fp32 model at ``fp32`` to ``target``.

    ``done`` (variant -> file already written) lets q4f16 start from q4 instead of quantising again;
    ``calibrate`` gives GPTQ recipes their codes (required for them).
    """
    import onnx

    recipe = RECIPES.get(variant)
    if recipe is None:
        raise ValueError(f"no quantiser for variant {variant!r}")
    for name, path in (done or {}).items():
        base = RECIPES.get(name)
        if recipe.fp16 and base is not None and not base.fp16 and dataclasses.replace(base, fp16=True) == recipe:
            _save(_to_fp16(float_scales(onnx.load(path))), target)
            return target
    model = onnx.load(fp32)
    gptq: dict[str, QuantizedLinear] = {}
    if recipe.method == "gptq":
        if calibrate is None:
            raise ValueError(f"variant {variant!r} is GPTQ-quantised: it needs the PyTorch model and calibration text")
        gptq = calibrate(recipe)
    # first, so that the head's MatMul is claimed before the MatMul quantiser sees it
    head = gptq.get("lm_head")
    quantize_tied_embedding(model, recipe.embed_bits, recipe.embed_block, recipe.accuracy_level, head)
    if gptq:
        replaced = apply_quantized(model, gptq, recipe.accuracy_level)
        log.info("%s: %d linear layers from GPTQ%s", variant, replaced, " and the tied head" if head else "")
    # round-to-nearest for every MatMul with a constant weight still left (all of them, without GPTQ)
    names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    keep8 = [n for n in names if any(part in n for part in recipe.eight_bit_layers)] if recipe.bits != 8 else []
    model = _matmul_nbits(model, recipe.bits, recipe.block, recipe.accuracy_level, keep8)
    if keep8:
        model = _matmul_nbits(model, 8, EIGHT_BIT_BLOCK, recipe.accuracy_level, exclude=[])
    model = _to_fp16(model) if recipe.fp16 else half_scales(model)
    _save(model, target)
    return target


def _matmul_nbits(
    model: onnx.ModelProto, bits: int, block: int, accuracy_level: int, exclude: list[str]
) -> onnx.ModelProto:
    """Every MatMul with a constant weight (but ``exclude``) -> MatMulNBits, symmetric round-to-nearest."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in fp16, graph inputs and outputs kept float32 (what callers feed)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def half_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store MatMulNBits' float32 block scales as float16 where that is exact, each behind a Cast.

    GPTQ and :func:`quantize_blockwise` pick every scale as a float16 value, so this loses
    nothing: the scales take half the bytes (an 8-bit model's file shrinks by ~3%), and
    onnxruntime folds the constant Cast at load, so the kernels see the same float32 scales
    and run as fast. Scales that are not exact halves (other quantisers') stay float32.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    names = {n.input[2] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 2}
    casts = []
    for name in sorted(names):
        init = inits.get(name)
        if init is None or init.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        half = value.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), value):
            continue
        init.CopyFrom(numpy_helper.from_array(half, f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def float_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo :func:`half_scales`: each Cast of a float16 initializer becomes the float32 initializer it makes."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    folded = [
        n for n in graph.node
        if n.op_type == "Cast" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.FLOAT16
    ]  # fmt: skip
    for node in folded:
        init = inits[node.input[0]]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), node.output[0]))
    made = {node.output[0] for node in folded}  # a tensor has one producer: its name identifies the Cast
    keep = [n for n in graph.node if n.op_type != "Cast" or n.output[0] not in made]
    del graph.node[:]
    graph.node.extend(keep)
    return model


def quantize_tied_embedding(
    model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int = 4, codes: QuantizedLinear | None = None
) -> bool:
    """Replace the fp32 embedding Gather and the tied head MatMul by one shared block-quantised matrix.

    ``codes`` (e.g. GPTQ's for the head) are used as given; else the matrix is rounded to nearest.
    Returns False (model untouched) where the graph has no such pair, e.g. an untied head.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits), None)
    if gather is None:
        return False
    weight_name = gather.input[0]
    transposes = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] == weight_name and _perm(n) in (None, [1, 0])
    }
    head = next((n for n in graph.node if n.op_type == "MatMul" and n.input[1] in transposes), None)
    if head is None:
        return False
    weight = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
    vocab, hidden = weight.shape
    block_size = fitting_block(hidden, block_size)
    if block_size == 0:
        return False
    if codes is None:
        packed, scales = quantize_blockwise(weight, bits, block_size)
    elif (codes.codes.shape, codes.bits, codes.block) != (weight.shape, bits, block_size):
        raise ValueError(
            f"head codes {codes.codes.shape} at {codes.bits} bits, blocks of {codes.block} do not fit the "
            f"embedding {weight.shape} at {bits} bits, blocks of {block_size}"
        )
    else:
        packed, scales = pack_codes(codes.codes, bits), codes.scales
    blocks = hidden // block_size
    q_name, s_name, shape_name = f"{weight_name}_q{bits}", f"{weight_name}_scales", f"{weight_name}_q{bits}_shape"
    graph.initializer.extend(
        [
            numpy_helper.from_array(packed, q_name),
            numpy_helper.from_array(scales, s_name),
            numpy_helper.from_array(np.array([vocab, blocks, block_size * bits // 8], np.int64), shape_name),
        ]
    )
    gather_nodes = _dequantizing_gather(gather, q_name, s_name, bits, block_size, blocks, hidden)
    # MatMulNBits wants B as [N, blocks, bytes per block]; a constant Reshape that runtimes fold at load
    reshape = helper.make_node(
        "Reshape", [q_name, shape_name], [f"{q_name}_3d"], name=f"{head.name or weight_name}_head_reshape"
    )
    new_head = helper.make_node(
        "MatMulNBits",
        [head.input[0], f"{q_name}_3d", s_name],
        list(head.output),
        name=f"{head.name or weight_name}_head_q{bits}",
        domain=MS_DOMAIN,
        K=hidden,
        N=vocab,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )
    nodes = list(graph.node)
    at = nodes.index(gather)
    nodes[at : at + 1] = gather_nodes
    nodes[nodes.index(head)] = new_head
    nodes.insert(nodes.index(new_head), reshape)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    log.info("Quantised the tied embedding/head (%dx%d) to %d bits, blocks of %d", vocab, hidden, bits, block_size)
    return True


def _dequantizing_gather(
    gather: onnx.NodeProto, q_name: str, s_name: str, bits: int, block_size: int, blocks: int, hidden: int
) -> list[onnx.NodeProto]:
    """Nodes computing ``gather``'s output from the packed rows: [b, s] ids -> [b, s, hidden] floats."""
    from onnx import TensorProto, helper

    ids, out = gather.input[1], gather.output[0]
    p = f"{gather.name or q_name}/dq{bits}"
    nodes = [
        helper.make_node("Gather", [q_name, ids], [f"{p}/rows"], name=f"{p}/rows", axis=0),
        helper.make_node("Gather", [s_name, ids], [f"{p}/scales"], name=f"{p}/scales", axis=0),
        helper.make_node("Cast", [f"{p}/rows"], [f"{p}/int"], name=f"{p}/int", to=TensorProto.INT32),
        _const(f"{p}/zp", np.array(2 ** (bits - 1), np.int32)),
    ]
    values = f"{p}/int"
    if bits == 4:  # byte = low | high << 4, low first
        nodes += [
            _const(f"{p}/sixteen", np.array(16, np.int32)),
            helper.make_node("Div", [values, f"{p}/sixteen"], [f"{p}/high"], name=f"{p}/high"),
            helper.make_node("Mul", [f"{p}/high", f"{p}/sixteen"], [f"{p}/high16"], name=f"{p}/high16"),
            helper.make_node("Sub", [values, f"{p}/high16"], [f"{p}/low"], name=f"{p}/low"),
            _const(f"{p}/last", np.array([3], np.int64)),
            helper.make_node("Unsqueeze", [f"{p}/low", f"{p}/last"], [f"{p}/low3"], name=f"{p}/low3"),
            helper.make_node("Unsqueeze", [f"{p}/high", f"{p}/last"], [f"{p}/high3"], name=f"{p}/high3"),
            helper.make_node("Concat", [f"{p}/low3", f"{p}/high3"], [f"{p}/pairs"], name=f"{p}/pairs", axis=3),
        ]
        values = f"{p}/pairs"
    nodes += [
        _const(f"{p}/blocked_shape", np.array([0, 0, blocks, block_size], np.int64)),
        helper.make_node("Reshape", [values, f"{p}/blocked_shape"], [f"{p}/blocked"], name=f"{p}/blocked"),
        helper.make_node("Sub", [f"{p}/blocked", f"{p}/zp"], [f"{p}/centred"], name=f"{p}/centred"),
        helper.make_node("Cast", [f"{p}/centred"], [f"{p}/float"], name=f"{p}/float", to=TensorProto.FLOAT),
        _const(f"{p}/last3", np.array([3], np.int64)),
        helper.make_node("Unsqueeze", [f"{p}/scales", f"{p}/last3"], [f"{p}/scales4"], name=f"{p}/scales4"),
        helper.make_node("Mul", [f"{p}/float", f"{p}/scales4"], [f"{p}/scaled"], name=f"{p}/scaled"),
        _const(f"{p}/out_shape", np.array([0, 0, hidden], np.int64)),
        helper.make_node("Reshape", [f"{p}/scaled", f"{p}/out_shape"], [out], name=f"{p}/out"),
    ]
    return nodes


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def fitting_block(width: int, wanted: int) -> int:
    """The largest power-of-two block <= ``wanted`` (and >= 16, the ops' minimum) that divides ``width``; 0 if none."""
    block = wanted
    while block >= 16:
        if width % block == 0:
            return block
        block //= 2
    return 0


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest per block of each row: (packed uint8 [rows, cols*bits/8], scales [rows, blocks]).

    Values are stored offset by 2^(bits-1), the zero point both contrib ops assume; every scale
    is a float16 value (see :func:`half_scales`).
    """
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block_size, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=2) / qmax
    scales[scales == 0] = 1.0
    scales = np.maximum(scales, np.float32(SMALLEST_HALF)).astype(np.float16).astype(np.float32)  # stored as float16
    codes = np.clip(np.rint(blocks / scales[..., None]), -qmax, qmax).reshape(rows, cols)
    return pack_codes(codes, bits), scales


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [rows, cols] -> the bytes MatMulNBits reads: offset by 2^(bits-1), 4-bit pairs low nibble first."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    q = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q)


def apply_quantized(model: onnx.ModelProto, quantized: dict[str, QuantizedLinear], accuracy_level: int) -> int:
    """Replace each MatMul whose weight is a layer in ``quantized`` by MatMulNBits with those codes and scales.

    optimum names a linear layer's node after its module (``/model/layers.0/mlp/up_proj/MatMul``
    for ``model.layers.0.mlp.up_proj``); the weight initializer must be that layer's [in, out].
    Returns how many nodes were replaced.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    nodes = list(graph.node)
    replaced = 0
    for at, node in enumerate(nodes):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        layer = quantized.get(module)
        if layer is None:
            continue
        out_features, in_features = layer.codes.shape
        shape = tuple(inits[node.input[1]].dims)
        if shape != (in_features, out_features):
            raise ValueError(
                f"{node.name}: weight {shape} does not match {module}'s quantised [{in_features}, {out_features}]"
            )
        blocks = in_features // layer.block
        packed = pack_codes(layer.codes, layer.bits).reshape(out_features, blocks, layer.block * layer.bits // 8)
        q_name, s_name = f"{module}.weight_q{layer.bits}", f"{module}.weight_scales"
        graph.initializer.extend(
            [numpy_helper.from_array(packed, q_name), numpy_helper.from_array(layer.scales, s_name)]
        )
        nodes[at] = helper.make_node(
            "MatMulNBits",
            [node.input[0], q_name, s_name],
            list(node.output),
            name=f"{node.name}_q{layer.bits}",
            domain=MS_DOMAIN,
            K=in_features,
            N=out_features,
            bits=layer.bits,
            block_size=layer.block,
            accuracy_level=accuracy_level,
        )
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    if replaced and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return replaced


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (the old Transpose), then orphaned initializers."""
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {name for n in graph.node for name in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output) or not n.output]
        changed = len(keep) != len(graph.node)
        if changed:
            del graph.node[:]
            graph.node.extend(keep)
    used = {name for n in graph.node for name in n.input} | outputs
    keep_inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)


def _save(model: onnx.ModelProto, target: Path) -> None:
    import onnx

    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target)
    log.info("Wrote %s (%.1f MB)", target.name, target.stat().st_size / 1e6)
