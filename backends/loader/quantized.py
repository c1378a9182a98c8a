"""Pre-quantized checkpoints: GPTQ, AWQ (GEMM) and compressed-tensors (pack-quantized W4A16 /
W8A16, as llmcompressor writes them). The format is detected from config.json's
`quantization_config` (or a GPTQ `quantize_config.json`); each linear's tensors are read into
kernels.int4_linear.Int4Data (4-bit) or kernels.int8_linear.Int8Weight (8-bit, per channel), checked
against the model's shapes and the format's settings: a disagreement is an error naming the tensor.

Layouts (K = in_features, N = out_features, G = group size):
- GPTQ: qweight int32 [K/8, N] (8 consecutive k per word, k % 8 in nibble k % 8); qzeros int32
  [K/G, N/8]; scales [K/G, N]; g_idx int32 [K] (act-order). checkpoint_format "gptq" (v1) stores
  zero - 1, "gptq_v2" the zero. w = (q - zero) * scale.
- AWQ (version "gemm"): qweight int32 [K, N/8] and qzeros [K/G, N/8], 8 columns per word in the
  order 0, 2, 4, 6, 1, 3, 5, 7; scales [K/G, N].
- compressed-tensors pack-quantized: weight_packed int32 [N, K * bits / 32], element i of a row in
  bits [i * bits, (i + 1) * bits) (little-endian), stored as q + 2^(bits-1); weight_scale [N, K/G]
  (or [N, 1] per channel); weight_zero_point (asymmetric) packed the same way along N; weight_shape
  [2]. w = (q - zero_point) * scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.kernels.int4_linear import Int4Data
from baton.kernels.int8_linear import Int8Weight
from baton.kernels.quant import Int4Weight, unpack_int4

from .safetensors_loader import CheckpointError, take

FORMATS = ("gptq", "awq", "compressed-tensors")
# tensors of a quantized linear, read as stored (never cast to the model's dtype)
RAW_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale",
                ".weight_zero_point", ".weight_shape", ".weight_g_idx")


class QuantizationError(CheckpointError):
    """The checkpoint's quantization is unsupported or inconsistent; the message names it."""


@dataclass(frozen=True)
class QuantConfig:
    method: str                  # one of FORMATS
    bits: int
    group_size: int              # 0: one group over all of K (per output channel)
    sym: bool
    desc_act: bool
    zero_offset: int             # GPTQ v1: qzeros hold zero - 1
    ignore: tuple[str, ...]      # modules left unquantized
    source: str                  # where it was read, for messages
    lm_head: bool = False        # the lm_head is quantized too (GPTQ's lm_head=true)

    def describe(self) -> str:
        g = f"group {self.group_size}" if self.group_size else "per channel"
        return f"{self.method} {self.bits}-bit, {g}, {'symmetric' if self.sym else 'asymmetric'}" + \
            (", act-order" if self.desc_act else "")

    def quantized(self, module: str) -> bool:
        """Whether a module (e.g. model.layers.0.self_attn.q_proj) is stored quantized."""
        return not any(module == i or module.endswith("." + i) or (i.startswith("re:") and _re(i[3:], module))
                       for i in self.ignore)


def _re(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's quantization, or None for a float checkpoint."""
    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    qc, source = cfg.get("quantization_config"), "config.json quantization_config"
    if qc is None and (d / "quantize_config.json").is_file():
        qc, source = json.loads((d / "quantize_config.json").read_text()), "quantize_config.json"
        qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq(qc, source)
    if method == "awq":
        return _awq(qc, source)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, source)
    raise QuantizationError(f"{source}: quant_method {qc.get('quant_method')!r} is not supported "
                            f"(supported: {', '.join(FORMATS)})")


def _bits4(bits: object, source: str, method: str) -> int:
    if bits != 4:
        raise QuantizationError(f"{source}: {method} with bits={bits} is not supported (4-bit only)")
    return 4


def _group(g: object, source: str) -> int:
    if g in (-1, None, 0):
        return 0
    if not isinstance(g, int) or g <= 0 or g % 2:
        raise QuantizationError(f"{source}: group_size={g!r} is not supported (an even positive size, or -1)")
    return g


def _gptq(qc: dict, source: str) -> QuantConfig:
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantizationError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return QuantConfig("gptq", _bits4(qc.get("bits"), source, "GPTQ"), _group(qc.get("group_size", 128), source),
                       bool(qc.get("sym", True)), bool(qc.get("desc_act", False)), 1 if fmt == "gptq" else 0,
                       tuple(qc.get("modules_to_not_convert") or ()), source, bool(qc.get("lm_head", False)))


def _awq(qc: dict, source: str) -> QuantConfig:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationError(f"{source}: AWQ version {version!r} is not supported (gemm)")
    bits = qc.get("bits", qc.get("w_bit"))
    # zero_point=false (symmetric) checkpoints still store qzeros (all 8), which are read as they are
    return QuantConfig("awq", _bits4(bits, source, "AWQ"), _group(qc.get("group_size", qc.get("q_group_size")), source),
                       not qc.get("zero_point", True), False, 0, tuple(qc.get("modules_to_not_convert") or ()), source)


def _compressed_tensors(qc: dict, source: str) -> QuantConfig:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise QuantizationError(f"{source}: {len(groups)} config_groups; one scheme for every Linear is supported")
    name, scheme = next(iter(groups.items()))
    fmt = scheme.get("format") or qc.get("format")
    where = f"{source} config_groups.{name}"
    if fmt != "pack-quantized":
        raise QuantizationError(f"{where}: format {fmt!r} is not supported (pack-quantized)")
    if scheme.get("input_activations") or scheme.get("output_activations"):
        raise QuantizationError(f"{where}: activation quantization is not supported (weight-only W4A16/W8A16)")
    w = scheme.get("weights") or {}
    bits, strategy, sym = w.get("num_bits"), w.get("strategy"), bool(w.get("symmetric", True))
    if w.get("type", "int") != "int" or w.get("dynamic"):
        raise QuantizationError(f"{where}: weights of type {w.get('type')!r}, dynamic={w.get('dynamic')} are not "
                                "supported (static int)")
    if strategy not in ("group", "channel"):
        raise QuantizationError(f"{where}: weights strategy {strategy!r} is not supported (group, channel)")
    if bits == 8 and not (strategy == "channel" and sym):
        raise QuantizationError(f"{where}: 8-bit weights are supported per channel and symmetric only "
                                f"(got {strategy}, symmetric={sym})")
    if bits not in (4, 8):
        raise QuantizationError(f"{where}: num_bits={bits} is not supported (4 or 8)")
    group = _group(w.get("group_size"), where) if strategy == "group" else 0
    return QuantConfig("compressed-tensors", bits, group, sym, w.get("actorder") == "group", 0,
                       tuple(qc.get("ignore") or ()), source)


def check_shape(t: torch.Tensor, name: str, want: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != want:
        raise QuantizationError(f"checkpoint tensor {name!r} has shape {list(t.shape)}, expected {list(want)} ({why})")


def read_linear(state: dict[str, torch.Tensor], prefix: str, n: int, k: int,
                qc: QuantConfig) -> Int4Data | Int8Weight:
    """The quantized linear `prefix` (e.g. model.layers.0.mlp.down_proj) of shape [n, k]."""
    G = qc.group_size or k
    if k % G:
        raise QuantizationError(f"{prefix}: in_features {k} is not a multiple of group_size {G} ({qc.source})")
    if qc.method == "compressed-tensors":
        return _read_ct(state, prefix, n, k, G, qc)
    qweight, qzeros, scales = (take(state, f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales"))
    g_idx = state.pop(f"{prefix}.g_idx", None)
    packed = (k // 8, n) if qc.method == "gptq" else (k, n // 8)
    check_shape(qweight, f"{prefix}.qweight", packed, f"[{n}, {k}] at 4 bits in the {qc.method} layout")
    check_shape(qzeros, f"{prefix}.qzeros", (k // G, n // 8), f"group_size {G}: {k // G} groups, 8 zeros per word")
    check_shape(scales, f"{prefix}.scales", (k // G, n), f"group_size {G}: {k // G} groups")
    for name, t in ((f"{prefix}.qweight", qweight), (f"{prefix}.qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise QuantizationError(f"checkpoint tensor {name!r} is {t.dtype}, expected int32 (4-bit packed)")
    w = Int4Weight(qweight, qzeros, scales, G, qc.method, None, qc.zero_offset)
    q, z = unpack_int4(w)
    if g_idx is not None:
        check_shape(g_idx, f"{prefix}.g_idx", (k,), "one group per input column")
        g_idx = g_idx.long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= k // G:
            raise QuantizationError(f"checkpoint tensor '{prefix}.g_idx' names groups outside 0..{k // G - 1}")
        if torch.equal(g_idx, torch.arange(k) // G):
            g_idx = None                      # no act-order: the plain grouping
    return Int4Data(q.to(torch.uint8).contiguous(), z.T.to(torch.uint8).contiguous(), scales.T.contiguous(), G, g_idx)


def _unpack_ct(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """[R, W] int32 -> [R, cols] stored values (unsigned, 0 .. 2^bits - 1), element i at bits i*bits."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0], packed.shape[1] * per)[:, :cols]


def _read_ct(state: dict[str, torch.Tensor], prefix: str, n: int, k: int, G: int, qc: QuantConfig) -> Int4Data | Int8Weight:
    bits = qc.bits
    packed, scale = take(state, f"{prefix}.weight_packed"), take(state, f"{prefix}.weight_scale")
    shape = state.pop(f"{prefix}.weight_shape", None)
    if shape is not None and [int(x) for x in shape.flatten()] != [n, k]:
        raise QuantizationError(f"checkpoint tensor '{prefix}.weight_shape' says {shape.tolist()}, the model has [{n}, {k}]")
    if packed.dtype != torch.int32:
        raise QuantizationError(f"checkpoint tensor '{prefix}.weight_packed' is {packed.dtype}, expected int32")
    check_shape(packed, f"{prefix}.weight_packed", (n, -(-k * bits // 32)), f"[{n}, {k}] at {bits} bits")
    check_shape(scale, f"{prefix}.weight_scale", (n, k // G), f"{k // G} group(s) of {G}")
    q = _unpack_ct(packed, bits, k)                        # q + 2^(bits-1)
    if bits == 8:
        return Int8Weight((q - 128).to(torch.int8).contiguous(), scale.float().view(n).contiguous(), (n, k), False)
    zp = state.pop(f"{prefix}.weight_zero_point", None)
    if qc.sym:
        zero = torch.full((n, k // G), 8, dtype=torch.uint8)
    else:
        if zp is None:
            raise QuantizationError(f"checkpoint is missing tensor '{prefix}.weight_zero_point' (asymmetric weights)")
        check_shape(zp, f"{prefix}.weight_zero_point", (-(-n * bits // 32), k // G), "zero points packed along N")
        zero = _unpack_ct(zp.T.contiguous(), bits, n).T.to(torch.uint8).contiguous()
    g_idx = state.pop(f"{prefix}.weight_g_idx", None)
    if g_idx is not None:
        check_shape(g_idx, f"{prefix}.weight_g_idx", (k,), "one group per input column")
        g_idx = None if torch.equal(g_idx.long(), torch.arange(k) // G) else g_idx.long()
    return Int4Data(q.to(torch.uint8).contiguous(), zero, scale.contiguous(), G, g_idx)


def checkpoint_quantization(requested: str, model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's own quantization, checked against the engine's `quantization` setting:
    "" takes whatever the checkpoint holds (as vLLM does), a format name must match it, and
    "int8" (quantize at load) needs a float checkpoint."""
    qc = read_quant_config(model_dir)
    if qc is None:
        if requested in FORMATS:
            raise QuantizationError(f"quantization: {requested!r} needs a {requested} checkpoint; "
                                    f"{str(model_dir)!r} has no quantization_config")
        return None
    if requested and requested != qc.method:
        raise QuantizationError(f"quantization: {requested!r} given, but {str(model_dir)!r} is a {qc.describe()} "
                                f"checkpoint ({qc.source}); leave quantization empty or set it to {qc.method!r}")
    return qc
