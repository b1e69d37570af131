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

from ..core import scheduling
from .conditioning import Conditioning
from .hub import MissingCheckpointError, resolve_dir  # noqa: F401 - MissingCheckpointError re-exported here

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# sd: SD 1.x/2.x, SD-Turbo, the tiny world (CFG by batch concatenation, DDIM step)
# lcm: latent consistency models (guidance embedding, LCM step)
# sdxl: SDXL base / SDXL-Turbo: two text encoders (penultimate hidden states concatenated), pooled embeddings and
#       size/crop time ids in `added_cond_kwargs`; CFG by batch concatenation, DDIM step
FAMILIES = ("sd", "lcm", "sdxl")


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
    vae: str | None  # a VAE to use instead of the pipeline's own (SDXL's fp16-fix VAE): directory or hub id

    @classmethod
    def from_config(cls, model_cfg) -> "ModelSpec":
        """The spec from a `model` config node (conf/model/*.yaml) or any mapping with the same keys."""
        return cls(**{f.name: model_cfg[f.name] for f in fields(cls)})


def _check_path(spec: ModelSpec) -> Path:
    """A local pipeline directory: the path itself, or a hub id found in the local HF cache (downloaded first
    unless HF_HUB_OFFLINE=1). Anything else is a MissingCheckpointError naming the hub id and the download
    command (models/hub.py) — never a fallback."""
    return resolve_dir(spec.path, what=f"model {spec.name!r}",
                       hint=spec.download_hint or f"download the diffusers pipeline for model {spec.name!r}")


def _check_family(spec: ModelSpec, unet_config) -> None:
    found = unet_family(unet_config)
    if found != spec.family:
        raise ValueError(f"model {spec.name!r}: model.family={spec.family} but the UNet at {spec.path} is a "
                         f"{found!r} UNet ({_FAMILY_EVIDENCE[found]}); set model.family={found} or point "
                         f"model.path at a {spec.family} checkpoint")


def unet_family(unet_config) -> str:
    """The family a UNet's own config says it belongs to (to check `model.family` against the checkpoint)."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if getattr(unet_config, "time_cond_proj_dim", None) is not None:
        return "lcm"
    return "sd"


class DiffusionModel:
    """A text-to-image latent diffusion model behind one interface for every family."""

    def __init__(self, spec: ModelSpec, unet, vae, text_encoder, tokenizer, scheduler_config: dict, device="cpu",
                 text_encoder_2=None, tokenizer_2=None, zero_uncond: bool = False):
        """`text_encoder_2` / `tokenizer_2`: SDXL's second (projection) text encoder. `zero_uncond`: CFG's
        unconditional branch is all-zero embeddings rather than the encoded "" (SDXL's
        `force_zeros_for_empty_prompt`, which the stock pipeline applies)."""
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = DTYPES[spec.dtype]
        self.unet = _to(unet, self.device, self.dtype).requires_grad_(False)
        self.vae = _to(vae, self.device, self.dtype).requires_grad_(False).eval()
        self.text_encoder = _to(text_encoder, self.device, self.dtype).requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.text_encoder_2 = (None if text_encoder_2 is None
                               else _to(text_encoder_2, self.device, self.dtype).requires_grad_(False).eval())
        self.tokenizer_2 = tokenizer_2
        self.zero_uncond = zero_uncond
        if spec.family == "sdxl" and (text_encoder_2 is None or tokenizer_2 is None):
            raise ValueError(f"model {spec.name!r}: the sdxl family needs text_encoder_2 and tokenizer_2")
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
        _check_family(spec, unet.config)
        self.vae_scale = float(vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._uncond: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, spec: ModelSpec, device="cpu") -> "DiffusionModel":
        """Load every component with `from_pretrained(path)`, the same path for tiny and real models (and for the
        tiny random replicas of models/testing.py). SDXL adds `text_encoder_2` / `tokenizer_2`; `spec.vae` replaces
        the pipeline's VAE (SDXL's fp16-fix VAE)."""
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        if spec.family not in FAMILIES:
            raise ValueError(f"unknown model.family {spec.family!r}; expected one of {list(FAMILIES)}")
        path = _check_path(spec)
        dtype = DTYPES[spec.dtype]
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        _check_family(spec, unet.config)  # before the other components: a wrong family fails on its real cause
        if spec.vae:
            vae_dir = resolve_dir(spec.vae, what=f"model {spec.name!r}: VAE (model.vae)",
                                  hint="or set model.vae=null to use the pipeline's own VAE")
            vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype)
        else:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer")
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        extra = {}
        if spec.family == "sdxl":
            from transformers import CLIPTextModelWithProjection

            index = json.loads((path / "model_index.json").read_text())
            extra = dict(
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                           dtype=dtype),
                tokenizer_2=AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer_2"),
                zero_uncond=bool(index.get("force_zeros_for_empty_prompt", True)),
            )
        return cls(spec, unet, vae, text_encoder, tokenizer, scheduler_config, device, **extra)

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
        """The UNet's conditioning for B prompts, padded to the tokenizer's max length.

        sd / lcm: the text encoder's last hidden state, prompt_embeds (B, L, D).
        sdxl: both encoders' penultimate hidden states concatenated, prompt_embeds (B, L, D1 + D2); the second
        encoder's projected pooled output, pooled_embeds (B, P); time_ids (B, 6) = (H, W, 0, 0, H, W) at the
        sampling resolution (no crop), as the stock SDXL pipeline builds them."""
        if self.family != "sdxl":
            return Conditioning(prompt_embeds=self.text_encoder(self._token_ids(self.tokenizer, prompts))[0]
                                .to(self.dtype))
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds  # the projection encoder's (the second one's) pooled output
        size = self.latent_size * self.vae_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=self.dtype, device=self.device)
        return Conditioning(prompt_embeds=torch.cat(hidden, dim=-1).to(self.dtype), pooled_embeds=pooled.to(self.dtype),
                            time_ids=time_ids.expand(len(prompts), 6))

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def uncond(self, batch: int) -> Conditioning:
        """CFG's unconditional branch, built once, broadcast to `batch`: the encoded empty prompt "", or all zeros
        (time ids kept) when the checkpoint asks for it (SDXL's force_zeros_for_empty_prompt)."""
        if self._uncond is None:
            empty = self.encode_prompts([""])
            if self.zero_uncond:
                empty = Conditioning(torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_embeds),
                                     empty.time_ids)
            self._uncond = empty
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
        if self.family == "sdxl":
            return {"encoder_hidden_states": cond.prompt_embeds,
                    "added_cond_kwargs": {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}}
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
        """Write the LoRA as the family's stock pipeline saves it (`pipe.load_lora_weights(directory)` reads it)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline if self.family == "sdxl" else StableDiffusionPipeline
        pipeline.save_lora_weights(str(directory), unet_lora_layers=self.lora_state_dict(), safe_serialization=True)

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
