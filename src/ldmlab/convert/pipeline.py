"""A complete diffusers `StableDiffusionPipeline` directory from an ldmlab text-conditional LDM training checkpoint.

    OUT/model_index.json                 StableDiffusionPipeline, no safety checker / feature extractor
    OUT/unet/, OUT/vae/                  the checkpoint's U-Net (EMA weights with ema=True) and VAE; the VAE's
                                         `scaling_factor` is the model's latent_scale
    OUT/text_encoder/, OUT/tokenizer/    the CLIP text encoder named by `model.conditioner.path`, re-saved
    OUT/scheduler/scheduler_config.json  the training noise schedule and prediction type, with the settings of the
                                         model's sampler (DDIM -> DDIMScheduler, ...) as
                                         tests/test_diffusion_vs_diffusers.py shows them equal (a learned
                                         variance: DDPMScheduler, variance_type=learned_range); `_ldmlab_sampler`
                                         records its num_steps / eta (diffusers drops "_" keys: pass them to the
                                         pipeline call)

Only text models make such a pipeline; for class-conditional or unconditional checkpoints `write_pipeline` says
so on stderr and writes unet/ and vae/ alone. An inpainting model (model/image_condition=inpainting, SD-inpainting's
9 channels) is a `StableDiffusionInpaintPipeline`; a super-resolution model gets unet/ and vae/ only. Nothing is unpickled beyond tensors (`load_weights_only`).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import OmegaConf

from ldmlab.convert import checkpoint as ckpt
from ldmlab.convert import vae as vae_map
from ldmlab.convert.unet import DIFFUSERS_VERSION, diffusers_unet_config, unet_ldmlab_to_diffusers
from ldmlab.lit.settings import regroup
from ldmlab.nn.safe_load import load_weights_only

TEXT_CONDITIONER = "ldmlab.lit.conditioning.TextConditioner"
NEEDS_TEXT = "a StableDiffusionPipeline needs a text-conditional model (model.conditioner=TextConditioner)"
# ldmlab schedule function -> diffusers beta_schedule (schedules.py names both)
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "ddpm_linear": "linear", "cosine": "squaredcos_cap_v2"}
COSINE_FIXED = {"s": 0.008, "max_beta": 0.999}  # diffusers' squaredcos_cap_v2 hard-codes these
PREDICTION_TYPES = {"EpsPrediction": "epsilon", "VPrediction": "v_prediction", "X0Prediction": "sample"}
SCHEDULERS = {
    "ddim_sample": "DDIMScheduler",
    "ddpm_sample": "DDPMScheduler",
    "dpmpp_2m_sample": "DPMSolverMultistepScheduler",
    "euler_sample": "EulerDiscreteScheduler",
}


def _name(target: str) -> str:
    """The last component of a Hydra `_target_` (functions.py's `ddim_sample`, a class name)."""
    return target.rsplit(".", 1)[-1]


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """A function's config with the defaults of its `_target_` filled in (what instantiate would call it with)."""
    fn = hydra.utils.get_method(cfg["_target_"])
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    return {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}


def schedule_config(schedule: dict[str, Any]) -> dict[str, Any]:
    """diffusers scheduler fields of an ldmlab noise schedule config; other schedules travel as `trained_betas`."""
    name, args = _name(schedule["_target_"]), _with_defaults(schedule)
    out: dict[str, Any] = {"num_train_timesteps": int(args["num_timesteps"]), "trained_betas": None,
                           "rescale_betas_zero_snr": bool(args.get("zero_terminal_snr", False))}
    standard = name in BETA_SCHEDULES and (name != "cosine" or all(args[k] == v for k, v in COSINE_FIXED.items()))
    if not standard:  # exact β of any other schedule (diffusers reads them as float32)
        plain = {**schedule, "zero_terminal_snr": False} if "zero_terminal_snr" in args else schedule
        built = hydra.utils.instantiate(plain)  # unrescaled: diffusers rescales with rescale_betas_zero_snr
        return {**out, "beta_schedule": "linear", "trained_betas": built.betas.tolist()}
    out["beta_schedule"] = BETA_SCHEDULES[name]
    if name != "cosine":
        out.update(beta_start=float(args["beta_start"]), beta_end=float(args["beta_end"]))
    return out


def sampler_config(sampler: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(diffusers scheduler class, its settings) equal to an ldmlab sampler config (test_diffusion_vs_diffusers)."""
    name, args = _name(sampler["_target_"]), _with_defaults(sampler)
    if name not in SCHEDULERS:
        raise ValueError(f"sampler {sampler['_target_']} has no diffusers scheduler: use one of "
                         f"{', '.join(SCHEDULERS)} (model.diffusion.sampler)")
    if args.get("threshold") is not None:
        raise ValueError("the sampler thresholds x̂0 (model.diffusion.sampler.threshold): no diffusers scheduler setting "
                         "equals it, convert a model sampled without it")
    cls = SCHEDULERS[name]
    out = {"timestep_spacing": args["spacing"], "steps_offset": int(args["steps_offset"])}
    if cls == "DDIMScheduler":
        out.update(set_alpha_to_one=bool(args["set_alpha_to_one"]), clip_sample=False, thresholding=False)
    elif cls == "DDPMScheduler":
        out.update(variance_type={"beta_tilde": "fixed_small", "beta": "fixed_large"}[args["variance"]],
                   clip_sample=False, thresholding=False)
    elif cls == "DPMSolverMultistepScheduler":
        out.update(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, euler_at_final=False,
                   final_sigmas_type="zero", thresholding=False)
    else:
        out.update(use_karras_sigmas=bool(args["karras"]))
    out["_ldmlab_sampler"] = {k: args[k] for k in ("num_steps", "eta") if k in args}
    return cls, out


def scheduler_config(model: dict[str, Any]) -> dict[str, Any]:
    """diffusers `scheduler_config.json` of an ldmlab model config (its diffusion's schedule, prediction, variance
    and sampler)."""
    diffusion = model["diffusion"]
    prediction = _name(diffusion["prediction"]["_target_"])
    if prediction == "FlowMatching":  # FlowMatchEulerDiscreteScheduler lacks the SD pipeline's scale_model_input
        raise ValueError("model.diffusion.prediction=flow has no StableDiffusionPipeline scheduler (diffusers runs "
                         "flow matching in SD3/Flux pipelines only): sample it with python sample.py ckpt=...")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction {prediction} has no diffusers prediction_type ({', '.join(PREDICTION_TYPES)})")
    cls, sampler = sampler_config(diffusion["sampler"])
    if _name((diffusion.get("variance") or {}).get("_target_", "FixedVariance")) == "LearnedVariance":
        cls, sampler = learned_variance_scheduler(cls, sampler)
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **schedule_config(diffusion["noise_schedule"]),
            "prediction_type": PREDICTION_TYPES[prediction], **sampler}


def learned_variance_scheduler(cls: str, sampler: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A learned variance's (model/diffusion/variance=learned) scheduler: DDPMScheduler with
    variance_type=learned_range, the only diffusers scheduler that splits the U-Net's 2C output (equal to ldmlab's
    ddpm sampler: tests/test_variance_vs_diffusers.py), on the model sampler's spacing and step count."""
    if cls != "DDPMScheduler":
        _warn(f"model/diffusion/variance=learned: diffusers' {cls} cannot read the U-Net's [prediction | variance] "
              "output; wrote DDPMScheduler (variance_type=learned_range) on the model sampler's timesteps instead")
    _warn("model/diffusion/variance=learned: StableDiffusionPipeline's classifier-free guidance also extrapolates the "
          "variance half; sample.py guides the prediction half only (GLIDE), so images differ at guidance > 1")
    keep = {k: sampler[k] for k in ("timestep_spacing", "steps_offset")}
    steps = {"num_steps": sampler["_ldmlab_sampler"]["num_steps"]}
    return "DDPMScheduler", {**keep, "variance_type": "learned_range", "clip_sample": False, "thresholding": False,
                             "_ldmlab_sampler": steps}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_scheduler(cfg: dict[str, Any]) -> None:
    """Warn where the pipeline will not step as ldmlab's sampler does."""
    if cfg["timestep_spacing"] == "leading" and cfg["steps_offset"] != 1:
        _warn(f"steps_offset={cfg['steps_offset']}: StableDiffusionPipeline rewrites it to 1, which moves the "
              "'leading' timesteps; sample with model.diffusion.sampler.steps_offset=1 to match")
    if cfg["_class_name"] == "DDIMScheduler" and cfg["timestep_spacing"] != "leading":
        _warn("DDIMScheduler steps back by T // n, not to the next grid timestep (diffusers #12633): with "
              f"'{cfg['timestep_spacing']}' spacing its images differ from ldmlab's unless n divides T")


def model_config(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The resolved `model` config a train.py checkpoint stores (`ldmlab_config`), older flat keys regrouped."""
    if "ldmlab_config" not in raw:
        raise ValueError(f"{path} carries no ldmlab_config: give a train.py checkpoint (run/checkpoints/last.ckpt)")
    cfg = OmegaConf.create(raw["ldmlab_config"])
    return OmegaConf.to_container(regroup(cfg.model), resolve=True)  # type: ignore[return-value]


def _write_text_parts(clip_dir: Path, out: Path, max_length: int) -> list[Path]:
    """OUT/text_encoder and OUT/tokenizer, re-saved from the conditioner's local CLIP directory."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (clip_dir / "config.json").exists():
        raise FileNotFoundError(f"text encoder '{clip_dir}' (model.conditioner.path) not found: pass --text-encoder "
                                "DIR, the local CLIPTextModel + tokenizer directory the model trained with")
    CLIPTextModel.from_pretrained(str(clip_dir)).save_pretrained(str(out / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    tokenizer.model_max_length = max_length  # the pipeline pads prompts to this (TextConditioner: max_length)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return [out / "text_encoder", out / "tokenizer"]


def model_index(scheduler_class: str, pipeline: str = "StableDiffusionPipeline") -> dict[str, Any]:
    """`model_index.json` of a StableDiffusion(Inpaint)Pipeline without safety checker, feature extractor or image
    encoder."""
    return {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def write_pipeline(path: str | Path, out: str | Path, ema: bool = False,
                   text_encoder: str | Path | None = None) -> list[Path]:
    """Write a StableDiffusionPipeline directory for the train.py checkpoint at `path`; returns the paths written.

    `text_encoder` overrides the CLIP directory the checkpoint names. Class-conditional and unconditional models get
    unet/ and vae/ only, with one line on stderr saying why."""
    path, out = Path(path), Path(out)
    raw = load_weights_only(path)
    model = model_config(raw, path)
    unet_sd, unet_cfg, latent_side = ckpt.load_training_checkpoint(raw, path, "unet", ema=ema)
    vae_sd, vae_cfg, image_side = ckpt.load_training_checkpoint(raw, path, "vae")
    scale = float(raw["state_dict"].get("latent_scale", 0.0))
    if scale == 0.0:
        raise ValueError(f"{path} has no latent_scale (never estimated): train at least one step first")
    if latent_side is None:
        raise ValueError(f"{path} records no latent_shape: the size the model trained at is unknown")
    paths = [ckpt.write_diffusers_dir(unet_ldmlab_to_diffusers(unet_sd, unet_cfg),
                                      diffusers_unet_config(unet_cfg, latent_side), out / "unet"),
             ckpt.write_diffusers_dir(vae_map.ldmlab_to_diffusers(vae_sd),
                                      ckpt.diffusers_vae_config(vae_cfg, scale, image_side), out / "vae")]
    conditioner, image = model.get("conditioner") or {}, _name((model.get("image_condition") or {}).get("_target_", ""))
    if image == "SuperResolution":
        print(f"{path} is a super-resolution model, which no diffusers pipeline conditions as ldmlab does (sample.py "
              "image=...): wrote unet/ and vae/ only", file=sys.stderr)
        return paths
    if conditioner.get("_target_") != TEXT_CONDITIONER:
        print(f"{NEEDS_TEXT}; {path} is {'class-conditional' if conditioner else 'unconditional'}: wrote unet/ "
              "and vae/ only", file=sys.stderr)
        return paths
    clip_dir = Path(text_encoder or conditioner["path"])
    paths += _write_text_parts(clip_dir, out, int(conditioner.get("max_length", 77)))
    scheduler = scheduler_config(model)
    _check_scheduler(scheduler)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    pipeline = "StableDiffusionInpaintPipeline" if image == "Inpainting" else "StableDiffusionPipeline"
    (out / "model_index.json").write_text(json.dumps(model_index(scheduler["_class_name"], pipeline), indent=2) + "\n")
    return [*paths, out / "scheduler", out / "model_index.json"]
