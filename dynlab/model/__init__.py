"""dynlab.model: pico-decoder and its ReLoRA wrapper."""

from __future__ import annotations

from pathlib import Path

from dynlab.errors import InputError
from dynlab.model.pico_decoder import PRESETS, ModelConfig, PicoDecoder
from dynlab.runs.files import RUN_JSON, read_run_json
from dynlab.runs.layout import CheckpointError

__all__ = ["ModelConfig", "PicoDecoder", "PRESETS", "load_checkpoint_model", "read_model_config"]

def read_model_config(run_dir: str | Path) -> ModelConfig:
    """The ModelConfig stored in RUN/run.json["model"]."""
    path = Path(run_dir) / RUN_JSON
    try:
        run = read_run_json(run_dir)
    except CheckpointError as err:
        raise InputError(str(err)) from err
    if not isinstance(run.get("model"), dict):
        raise InputError(f"{path}: missing the 'model' section")
    try:
        return ModelConfig.from_dict(run["model"]).check_decoder()
    except (TypeError, ValueError) as err:  # a missing key, or a value of the wrong kind
        raise InputError(f"{path}: 'model' section: {err}") from err


def load_checkpoint_model(checkpoint_dir: str | Path, device: str = "cpu") -> PicoDecoder:
    """A plain PicoDecoder (eval mode) holding RUN/checkpoints/step_N/weights.safetensors.

    The model shape comes from run.json two levels up. LoRA factors (`*.lora_A`,
    `*.lora_B`) are dropped: a relora checkpoint stores the effective weight W + s·B·A
    under the standard names, so it loads as the function the relora model computes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(checkpoint_dir)
    weights = ckpt / "weights.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no weights.safetensors in checkpoint {ckpt}")
    model = PicoDecoder(read_model_config(ckpt.parent.parent))
    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise InputError(f"{weights}: truncated or not a safetensors file ({err})") from err
    state = {k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: does not match run.json's model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return model.to(device).eval()
