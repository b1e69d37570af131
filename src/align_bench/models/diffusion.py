"""Model adapter over diffusers components: the only place that knows how a model family is called.

It owns prompt encoding into a `Conditioning` (incl. CFG's empty-prompt one), the UNet call (CFG by batch
concatenation [uncond; cond], or LCM's guidance embedding), latent decoding, the training noise schedule, the
timestep grid for N sampling steps, the scheduler step, and LoRA (peft). Device and dtype are handled here and
nowhere else. `spec.family` (from `model.family` in conf/model/*.yaml) is the one switch between families; a
checkpoint whose UNet contradicts it is refused at load.

Shapes: latents (B, C, h, w); Conditioning.prompt_embeds (B, L, D); images (B, 3, H, W) float in [0, 1].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .. import resolve_path
from ..core import scheduling
from .conditioning import Conditioning

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# sd: SD 1.x/2.x, SD-Turbo, the tiny world (CFG by batch concatenation, DDIM step)
# lcm: latent consistency models (guidance embedding, LCM step)
# sdxl: two text encoders, pooled embeddings and time ids (lands with the real-models work)
FAMILIES = ("sd", "lcm", "sdxl")


class MissingCheckpointError(FileNotFoundError):
    """A real model's weights are not on disk: the message names what to download and where to put it."""


@dataclass(frozen=True)
class ModelSpec:
    """What the adapter needs to know about a model; built from `cfg.model` by `from_config` (the YAML holds the
    values, this class only names them)."""

    name: str
    path: str  # diffusers pipeline directory (or hub id when a hub is reachable)
    family: str  # one of FAMILIES
    timestep_spacing: str
    steps_offset: int
    resolution: int | None  # None: the UNet's sample_size × VAE factor
    dtype: str  # frozen weights' dtype; LoRA parameters are always fp32
    download_hint: str  # printed when `path` is missing

    @classmethod
    def from_config(cls, model_cfg) -> "ModelSpec":
        """The spec from a `model` config node (conf/model/*.yaml) or any mapping with the same keys."""
        return cls(**{f.name: model_cfg[f.name] for f in fields(cls)})


def _check_path(spec: ModelSpec) -> Path:
    """A local pipeline directory: the path itself, or a hub id found in the local HF cache (downloaded first
    unless HF_HUB_OFFLINE=1). Anything else is a MissingCheckpointError naming what to download — never a fallback."""
    import os

    path = resolve_path(spec.path)
    if path.is_dir():
        return path
    hint = spec.download_hint or f"download the diffusers pipeline for model {spec.name!r}"
    if spec.path.count("/") == 1 and not spec.path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            return Path(snapshot_download(spec.path, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing here
            raise MissingCheckpointError(f"model {spec.name!r}: {spec.path} is neither a local directory nor in "
                                         f"the Hugging Face cache ({type(e).__name__}) — {hint}") from None
    raise MissingCheckpointError(f"model {spec.name!r}: no checkpoint at {path} — {hint}")


def unet_family(unet_config) -> str:
    """The family a UNet's own config says it belongs to (to check `model.family` against the checkpoint)."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if getattr(unet_config, "time_cond_proj_dim", None) is not None:
        return "lcm"
    return "sd"


class DiffusionModel:
    """A text-to-image latent diffusion model behind one interface for every family."""

    def __init__(self, spec: ModelSpec, unet, vae, text_encoder, tokenizer, scheduler_config: dict, device="cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = DTYPES[spec.dtype]
        self.unet = _to(unet, self.device, self.dtype).requires_grad_(False)
        self.vae = _to(vae, self.device, self.dtype).requires_grad_(False).eval()
        self.text_encoder = _to(text_encoder, self.device, self.dtype).requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        T = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if self.scheduler_config.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ValueError(f"model {spec.name!r}: only the scaled_linear beta schedule is supported")
        self.alphas_cumprod = scheduling.alphas_cumprod_scaled_linear(
            T, self.scheduler_config.get("beta_start", 0.00085), self.scheduler_config.get("beta_end", 0.012)
        ).to(self.device)
        self.num_train_timesteps = T
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.family = spec.family
        self.is_lcm = spec.family == "lcm"
        found = unet_family(unet.config)
        if found != spec.family:
            raise ValueError(f"model {spec.name!r}: model.family={spec.family} but the UNet at {spec.path} is a "
                             f"{found!r} UNet ({_FAMILY_EVIDENCE[found]}); set model.family={found} or point "
                             f"model.path at a {spec.family} checkpoint")
        self.vae_scale = float(vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._uncond: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, spec: ModelSpec, device="cpu") -> "DiffusionModel":
        """Load every component with `from_pretrained(path)`, the same path for tiny and real models."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        if spec.family not in FAMILIES:
            raise ValueError(f"unknown model.family {spec.family!r}; expected one of {list(FAMILIES)}")
        if spec.family == "sdxl":
            raise NotImplementedError("model.family=sdxl is not supported yet (two text encoders, pooled embeddings "
                                      "and time ids)")
        path = _check_path(spec)
        dtype = DTYPES[spec.dtype]
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer")
        import json

        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        return cls(spec, unet, vae, text_encoder, tokenizer, scheduler_config, device)

    # -------------------------------------------------------------------------------------------------- shapes
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        if self.spec.resolution:
            return self.spec.resolution // self.vae_factor
        return int(self.unet.config.sample_size)

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), (B, C, h, w), drawn on CPU from `generator` so results match across devices."""
        shape = (batch, self.latent_channels, self.latent_size, self.latent_size)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)

    # ------------------------------------------------------------------------------------------------ schedule
    def timesteps(self, num_steps: int) -> torch.Tensor:
        """(N,) long timestep grid for N sampling steps on this model's spacing (core/scheduling.py's grids)."""
        if self.is_lcm:
            grid = scheduling.lcm_timestep_grid(
                num_steps, int(self.scheduler_config.get("original_inference_steps", 50)), self.num_train_timesteps
            )
        else:
            grid = scheduling.timestep_grid(
                num_steps, self.spec.timestep_spacing, self.num_train_timesteps, self.spec.steps_offset
            )
        return grid.to(self.device)

    def prev_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) t' per step. DDIM: next grid entry, −1 (final ᾱ) at the end. LCM: RLCM's rule, t' = t at the end."""
        return scheduling.previous_timesteps(timesteps, last=int(timesteps[-1]) if self.is_lcm else -1)

    @property
    def final_alpha_cumprod(self) -> float:
        # Every reference clamps the last t' to 0 (ᾱ_0, σ > 0); set_alpha_to_one=True would give σ = 0 there.
        return float(self.alphas_cumprod[0])

    def step(self, model_output, timestep, prev_timestep, sample, *, eta: float, prev_sample=None, noise=None,
             generator=None, deterministic: bool = False, draw: bool = True) -> scheduling.StepOutput:
        """Dispatch to the family's pure step kernel (DDIM with η, or LCM). `deterministic`: LCM's noise-free
        1-step output; `draw=False`: the transition's distribution only (prev_sample and log_prob None)."""
        if self.is_lcm:
            return scheduling.lcm_step(
                model_output, timestep, prev_timestep, sample, self.alphas_cumprod,
                prediction_type=self.prediction_type,
                timestep_scaling=float(self.scheduler_config.get("timestep_scaling", 10.0)),
                deterministic=deterministic, prev_sample=prev_sample, noise=noise, generator=generator, draw=draw,
            )
        return scheduling.ddim_step(
            model_output, timestep, prev_timestep, sample, self.alphas_cumprod, eta=eta,
            final_alpha_cumprod=self.final_alpha_cumprod, prediction_type=self.prediction_type,
            prev_sample=prev_sample, noise=noise, generator=generator, draw=draw,
        )

    # ----------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The UNet's conditioning for B prompts: the text encoder's last hidden state, padded to the tokenizer's
        max length, prompt_embeds (B, L, D)."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return Conditioning(prompt_embeds=self.text_encoder(ids)[0].to(self.dtype))

    def uncond(self, batch: int) -> Conditioning:
        """Conditioning of the empty prompt "" (CFG's unconditional branch), encoded once, broadcast to `batch`."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(batch)

    def guidance_embedding(self, guidance_scale: float, batch: int) -> torch.Tensor:
        """LCM's w-embedding: sinusoidal embedding of 1000·(guidance_scale − 1). (B, time_cond_proj_dim)."""
        dim = int(self.unet.config.time_cond_proj_dim)
        w = torch.full((batch,), (guidance_scale - 1.0) * 1000.0, dtype=torch.float32)
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        emb = w[:, None] * freqs[None, :]
        emb = torch.cat([emb.sin(), emb.cos()], dim=1)
        if dim % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb.to(self.device, self.dtype)

    # ------------------------------------------------------------------------------------------------ UNet call
    def _unet_kwargs(self, cond: Conditioning) -> dict:
        return {"encoder_hidden_states": cond.prompt_embeds}

    def predict(self, latents, timesteps, cond: Conditioning, guidance_scale: float, unet=None) -> torch.Tensor:
        """Guided model output for x_t. latents (B,C,h,w), timesteps (B,) or scalar, cond of B samples.

        `unet` is the module to forward through: pass the accelerate-prepared one in every differentiable
        forward so that DDP arms its gradient reducer (a forward through the bare module leaves DDP's gradients
        un-synchronised; docs/architecture.md)."""
        unet = unet if unet is not None else self.unet
        B = latents.shape[0]
        t = torch.as_tensor(timesteps, device=self.device).reshape(-1).expand(B)
        if self.is_lcm:
            w_embedding = self.guidance_embedding(guidance_scale, B)
            return unet(latents, t, timestep_cond=w_embedding, **self._unet_kwargs(cond)).sample
        if guidance_scale <= 1.0:
            return unet(latents, t, **self._unet_kwargs(cond)).sample
        both = Conditioning.cat([self.uncond(B).to(dtype=cond.prompt_embeds.dtype), cond])
        out = unet(torch.cat([latents, latents]), torch.cat([t, t]), **self._unet_kwargs(both)).sample
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    # -------------------------------------------------------------------------------------------------- decode
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B,C,h,w) → images (B,3,H,W) in [0,1] (differentiable; wrap in no_grad when not needed)."""
        images = self.vae.decode(latents.to(self.dtype) / self.vae_scale).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------------------------------------------- LoRA
    def add_lora(self, rank: int, alpha: float | None = None, targets=LORA_TARGETS, init: str = "gaussian") -> None:
        """Attach a peft LoRA adapter to the UNet (up-projection zero ⇒ the adapted UNet equals the base at init).
        Trainable parameters are fp32 whatever the frozen weights' dtype (the references' convention)."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init,
                            target_modules=list(targets))
        self.unet.add_adapter(config)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def lora_disabled(self, unet=None):
        """The frozen initial policy: the same peft UNet with its adapters off (no second UNet in memory)."""
        unet = _unwrap(unet if unet is not None else self.unet)
        has_lora = getattr(unet, "_hf_peft_config_loaded", False)
        if has_lora:
            unet.disable_adapters()
        try:
            yield
        finally:
            if has_lora:
                unet.enable_adapters()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights in diffusers' key format (what `pipe.load_lora_weights(dir)` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(_unwrap(self.unet)))

    def save_lora(self, directory: str | Path) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=self.lora_state_dict(),
                                                  safe_serialization=True)

    def load_lora(self, directory: str | Path) -> None:
        """Load LoRA weights written by `save_lora` into the already-attached adapter (resume)."""
        from safetensors.torch import load_file

        path = Path(directory) / "pytorch_lora_weights.safetensors"
        self.load_lora_state_dict(load_file(str(path)), source=str(path))

    def load_lora_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load LoRA weights in diffusers' key format (`unet.`-prefixed, as `save_lora` writes) into the attached
        adapter, in place (the optimizer keeps pointing at the same parameters)."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(_unwrap(self.unet), convert_unet_state_dict_to_peft(state))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"LoRA checkpoint {source} has unexpected keys: {result.unexpected_keys[:5]}")


_FAMILY_EVIDENCE = {"sd": "no guidance embedding, no added text-time conditioning",
                    "lcm": "its config has time_cond_proj_dim: a guidance embedding",
                    "sdxl": "its config has addition_embed_type=text_time"}


def _to(module, device, dtype):
    """Move to device; cast only when needed (diffusers warns on redundant dtype casts)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device)


def _unwrap(module):
    """The module inside DDP / accelerate / torch.compile wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module
