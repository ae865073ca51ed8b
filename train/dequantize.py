"""FP8 DeepSeek checkpoints to bf16, one shard at a time: `python -m train.dequantize SRC DST` (`make dequantize`).

DeepSeek-V3 / V3.1 (and V3.2) ship their linear weights as float8 e4m3 with one fp32 `<name>_scale_inv` per
128 x 128 block (config.json `quantization_config`: quant_method fp8, weight_block_size). Training runs in
bf16, so a conversion starts from a dequantised copy: weight = fp8 weight x its block's scale_inv. Every
other tensor is copied as it is; config.json loses `quantization_config`; tokenizer and other files are
copied. DST appears only once complete. Memory: one shard (and the scales it needs) at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from train.files import atomic_directory, safetensors_weight_map, write_shard_index

FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE_SUFFIX = "_scale_inv"


class DequantizeError(ValueError):
    """A checkpoint this tool cannot dequantise; the message names the file and the key."""


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """weight [R, C] float8 x scale_inv [ceil(R / b0), ceil(C / b1)] broadcast over its blocks, in fp32, then cast."""
    R, C = weight.shape
    b0, b1 = block
    expected = (-(-R // b0), -(-C // b1))
    if tuple(scale_inv.shape) != expected:
        raise DequantizeError(f"scale_inv of shape {list(scale_inv.shape)} for a weight of shape {[R, C]} and "
                              f"blocks {list(block)}; expected {list(expected)}")
    scale_RC = scale_inv.float().repeat_interleave(b0, 0)[:R].repeat_interleave(b1, 1)[:, :C]
    return (weight.float() * scale_RC).to(dtype)


def _fp8_block(config: dict, cfg_file: Path) -> tuple[int, int]:
    q = config.get("quantization_config")
    if not q:
        raise DequantizeError(f"{cfg_file}: no 'quantization_config': the checkpoint is not quantised "
                              "(use it as model.path directly)")
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise DequantizeError(f"{cfg_file}: quantization_config {q}; this tool reads quant_method 'fp8' with fmt "
                              "'e4m3' (DeepSeek's block-scaled FP8)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise DequantizeError(f"{cfg_file}: quantization_config.weight_block_size={block!r}; expected two "
                              "positive integers, e.g. [128, 128]")
    return block[0], block[1]


def _write_shards(src: Path, tmp: Path, weight_map: dict[str, str], block: tuple[int, int],
                  dtype: torch.dtype) -> int:
    """Writes every shard of `src` into `tmp` with its float8 weights dequantised and the scales dropped, plus
    the index (when `src` has one or several shards); returns how many weights were dequantised."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(set(weight_map.values()))
    new_map, t0, done, total_bytes = {}, time.time(), 0, 0
    for n, shard in enumerate(shards, 1):
        out = {}
        with safe_open(str(src / shard), framework="pt") as f:
            for key in f.keys():
                if key.endswith(SCALE_SUFFIX):
                    continue
                tensor = f.get_tensor(key)
                if tensor.dtype in FP8_DTYPES:
                    scale_key = key + SCALE_SUFFIX
                    if scale_key not in weight_map:
                        raise DequantizeError(f"{src / shard}: {key!r} is {tensor.dtype} but no {scale_key!r} exists")
                    with safe_open(str(src / weight_map[scale_key]), framework="pt") as g:
                        scale = g.get_tensor(scale_key)
                    try:
                        tensor = dequantize_weight(tensor, scale, block, dtype)
                    except DequantizeError as e:
                        raise DequantizeError(f"{src / shard}: {key!r}: {e}") from None
                    done += 1
                out[key] = tensor
                new_map[key] = shard
        save_file(out, str(tmp / shard), metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in out.values())
        print(f"[dequantize] {n}/{len(shards)} {shard}: {len(out)} tensors ({done} dequantised so far, "
              f"{time.time() - t0:.0f} s)", flush=True)
    if done == 0:
        raise DequantizeError(f"{src}: quantization_config says fp8, but no tensor is float8")
    if len(shards) > 1 or (src / "model.safetensors.index.json").is_file():
        write_shard_index(tmp, new_map, total_bytes)
    return done


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes the dequantised copy of checkpoint `src` to the new directory `dst` (atomically) and returns it."""
    src, dst = Path(src), Path(dst)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise DequantizeError(f"{cfg_file}: missing; SRC must be a Hugging Face checkpoint directory")
    config = json.loads(cfg_file.read_text())
    block = _fp8_block(config, cfg_file)
    if dst.exists():
        raise DequantizeError(f"{dst}: exists; give a new directory")
    weight_map = safetensors_weight_map(src)
    if not weight_map:
        raise DequantizeError(f"{src}: no *.safetensors weight files")
    with atomic_directory(dst, replace=False) as tmp:
        done = _write_shards(src, tmp, weight_map, block, dtype)
        config.pop("quantization_config")
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for extra in src.iterdir():  # tokenizer, generation config, code: as they are
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copy2(extra, tmp / extra.name)
    print(f"[dequantize] {done} weights dequantised to {str(dtype).removeprefix('torch.')} -> {dst}", flush=True)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="FP8 checkpoint directory (config.json with quantization_config, *.safetensors)")
    ap.add_argument("dst", help="new directory for the bf16 copy")
    args = ap.parse_args()
    try:
        dequantize_checkpoint(args.src, args.dst)
    except DequantizeError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
