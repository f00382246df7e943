"""The user's command line is a contract (STYLE 19): every `python train.py`, `sbatch` and `srun` line of
README.md and slurm/README.md, composed by Hydra and resolved by ldmlab.machine for a simulated 8-GPU bf16
node and for a CPU-only machine, resolves to what its words say: accelerator, devices, nodes, strategy
(with DDP's unused-parameter search), precision, speed switches, data and model.

A new line in either README is picked up by `doc_commands`; sbatch lines run the real slurm/train.sbatch with a
stand-in `srun` that records the train.py arguments the script would start. (Replaces test_readme.py, which
only checked that README.md's train.py lines compose to some `model._target_`.)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from conftest import REPO, compose_train
from omegaconf import DictConfig, OmegaConf

from ldmlab.machine import Machine, resolve_machine
from ldmlab.validate import ConfigError, batch_problems, check_config, fsdp_problems, guidance_problems

NODE = Machine(gpus=8, bf16=True)  # an 8-GPU node (H100/H200/A100: bf16)
LAPTOP = Machine(gpus=0, bf16=False)  # CPU only
DOCS = [REPO / "README.md", REPO / "slurm" / "README.md"]
SBATCH = REPO / "slurm" / "train.sbatch"
GPU_SPEED = "ldmlab.callbacks.speed.GPUSpeed"
VAE, LDM = "ldmlab.lit.vae.VAEModule", "ldmlab.lit.ldm.LatentDiffusionModule"
CLASSIFIER = "ldmlab.lit.noisy_classifier.NoisyClassifierModule"  # experiment=classifier_*: classifier guidance
MISSION = "python train.py model=unet_sd15 trainer.devices=8"


def doc_commands() -> list[str]:
    """Every `python train.py` / `sbatch` / `srun` line in the READMEs' bash blocks (continuations joined)."""
    lines = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+", " ", line.split(" #")[0]).strip()
                if re.match(r"(python train\.py|sbatch|srun)(\s|$)", line):
                    lines.append(line)
    return lines


# ---------------------------------------------------------------- what a line runs


def slurm_env(tasks: int, nodes: int, procid: int = 0) -> dict[str, str]:
    """What SLURM sets for task `procid` of a job of `nodes` x `tasks` tasks (srun's view)."""
    return {"SLURM_NTASKS": str(tasks * nodes), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % tasks),
            "SLURM_NODEID": str(procid // tasks), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ldmlab",
            "SLURM_JOB_NODELIST": "gpu-node-1", "SLURM_SUBMIT_DIR": str(REPO)}


def sbatch_default(option: str) -> int:
    """An `#SBATCH --<option>=N` default of slurm/train.sbatch."""
    return int(re.search(rf"^#SBATCH --{option}=(\d+)$", SBATCH.read_text(), flags=re.MULTILINE).group(1))


def sbatch_train_args(tokens: list[str], tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Run slurm/train.sbatch as SLURM would (its env from the sbatch options), with a stand-in `srun` that
    records what it was asked to start: the train.py arguments of every task."""
    script = tokens.index("slurm/train.sbatch")
    options = dict(t[2:].split("=", 1) for t in tokens[1:script] if t.startswith("--") and "=" in t)
    tasks = int(options.get("ntasks-per-node", sbatch_default("ntasks-per-node")))
    env = slurm_env(tasks, int(options.get("nodes", sbatch_default("nodes"))))
    bin_dir, record = tmp_path / "bin", tmp_path / "srun_args"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {record}\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho gpu-node-1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    run_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(SBATCH), *tokens[script + 1:]], env=run_env, cwd=REPO, check=True,
                   capture_output=True, timeout=60)
    srun = record.read_text().split("\0")[:-1]  # --kill-on-bad-exit=1 bash -c '<rank code>' train.sbatch ARGS
    return srun[srun.index("train.sbatch") + 1:], env


def train_args(line: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The train.py arguments a README line runs with, and the SLURM environment of its tasks ({} off SLURM)."""
    line = re.sub(r"\$\([^)]*\)", "/tmp/from-an-earlier-run", line)  # a path an earlier run wrote
    tokens = shlex.split(line)
    if tokens[0] == "sbatch":
        return sbatch_train_args(tokens, tmp_path)
    if tokens[0] == "srun":  # as in the salloc the slurm README names: 1 node x 8 tasks
        return tokens[tokens.index("train.py") + 1:], slurm_env(8, 1)
    return tokens[2:], {}


def overrides_of(args: list[str]) -> list[str]:
    """Hydra overrides to compose: flags dropped, a sweep's first value, `...` (the README's "and so on") out."""
    kept = []
    for arg in args:
        if arg.startswith("-") or arg == "...":
            continue
        key, _, value = arg.partition("=")
        if "," in value and not value.startswith(("[", "{", "'", '"')):  # a list or dict value is one value
            arg = f"{key}={value.split(',')[0]}"
        kept.append(arg)
    return kept


def words(overrides: list[str]) -> dict[str, str]:
    """The `key=value` pairs the user typed."""
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def compose_line(line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DictConfig, dict[str, str]]:
    """The composed (unresolved) config of a README line, run in its SLURM environment if it has one."""
    args, env = train_args(line, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    overrides = overrides_of(args)
    return compose_train(overrides, tmp_path), words(overrides)


def model_option(said: dict[str, str]) -> str:
    """The model option a line picks: its `model=`, else its experiment's `override /model:` ("" = the default)."""
    if "model" in said or "experiment" not in said:
        return said.get("model", "")
    found = re.search(r"override /model: (\w+)", (REPO / "conf" / "experiment" / f"{said['experiment']}.yaml").read_text())
    return found.group(1) if found else ""


def resolved(cfg: DictConfig, machine: Machine) -> DictConfig:
    return resolve_machine(OmegaConf.create(OmegaConf.to_container(cfg)), machine)


def summary(cfg: DictConfig) -> dict:
    """What a resolved config trains with, in the words of the contract."""
    t = cfg.trainer
    strategy = t.strategy if isinstance(t.strategy, str) else t.strategy._target_
    return {"accelerator": t.accelerator, "devices": t.devices, "num_nodes": t.num_nodes, "strategy": strategy,
            "precision": t.precision, "speed": OmegaConf.select(cfg, "callbacks.speed._target_"),
            "data": data_kind(cfg.data), "model": cfg.model._target_}


def data_kind(data: DictConfig) -> str:
    """'<source>+<decoder>' for the shard module (a source class, or 'shards' for named shards), else its class."""
    name = lambda target: target.rsplit(".", 1)[-1]
    if name(data._target_) != "ShardDataModule":
        return name(data._target_)
    source = name(data.source._target_) if OmegaConf.select(data, "source") is not None else "shards"
    return f"{source}+{name(data.decoder._target_)}"


def expected_module(said: dict[str, str]) -> str:
    """The LightningModule a line's words ask for: a U-Net model is the LDM, a classifier experiment the noise-aware
    classifier, anything else the default VAE."""
    if said.get("experiment", "").startswith("classifier"):
        return CLASSIFIER
    return LDM if model_option(said).startswith("unet") else VAE


def asks_for_gpus(composed: DictConfig) -> bool:
    """The line names GPUs (trainer=gpu/fsdp/experiment=vae_kl_f8) or several devices without saying CPU."""
    t = composed.trainer
    several = isinstance(t.devices, int) and t.devices > 1
    return t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and several)


# ---------------------------------------------------------------- every line


COMMANDS = doc_commands()


def test_the_readmes_have_the_lines_the_contract_names() -> None:
    assert MISSION in COMMANDS and "python train.py" in COMMANDS
    assert any(c.startswith("sbatch") for c in COMMANDS) and any(c.startswith("srun") for c in COMMANDS)
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("line", COMMANDS, ids=lambda c: c[:70])
def test_line_on_an_8_gpu_node(line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    composed, said = compose_line(line, tmp_path, monkeypatch)
    cfg = resolved(composed, NODE)
    t, got = cfg.trainer, summary(cfg)
    on_cpu = said.get("trainer.accelerator") == "cpu"
    assert got["accelerator"] == ("cpu" if on_cpu else "gpu")
    if "trainer.devices" in said:
        assert t.devices == int(said["trainer.devices"])
    assert isinstance(t.devices, int) and 1 <= t.devices <= NODE.gpus
    assert got["precision"] == said.get("trainer.precision", "32-true" if on_cpu else "bf16-mixed")
    assert got["speed"] == (None if on_cpu or said.get("speed") == "none" else GPU_SPEED)
    if on_cpu is False:
        assert t.benchmark is True
    world = t.devices * t.num_nodes
    if got["strategy"].endswith("FSDPStrategy"):
        assert said.get("trainer") == "fsdp"
    elif world > 1 or said.get("trainer") in ("ddp", "multinode"):
        # the VAE's GAN steps leave parameters without gradients; the LDM trains all of them
        assert got["strategy"] == ("ddp_find_unused_parameters_true" if got["model"] == VAE else "ddp")
    else:
        assert got["strategy"] == "auto"
    for key in ("model", "data"):
        assert hydra.utils.get_class(OmegaConf.select(cfg, f"{key}._target_"))
    assert got["model"] == expected_module(said)
    for key in ("data.train_urls", "data.root"):
        if key in said:
            assert OmegaConf.select(cfg, key) == said[key].strip("'\"")
    if said.get("model") == "unet_sd15":  # SD1.5 never trains on the 32 px demo crops
        assert got["data"] != "DemoShards+ImageDecoder"
    # the rules that span groups hold for what the line resolves to (files are the user's to provide)
    assert batch_problems(cfg) + fsdp_problems(cfg) + guidance_problems(cfg) == []


@pytest.mark.parametrize("line", COMMANDS, ids=lambda c: c[:70])
def test_line_on_a_cpu_only_machine(line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    composed, said = compose_line(line, tmp_path, monkeypatch)
    if asks_for_gpus(composed):  # one line, naming what to pass, before anything is built
        with pytest.raises(ConfigError, match=r"^trainer\.(devices|accelerator)=\S+ .*visible .*: ") as error:
            resolved(composed, LAPTOP)
        assert "\n" not in str(error.value) and "trainer.accelerator=cpu" in str(error.value)
        return
    got = summary(resolved(composed, LAPTOP))
    assert (got["accelerator"], got["speed"]) == ("cpu", None)
    assert got["precision"] == said.get("trainer.precision", "32-true")


# ---------------------------------------------------------------- the lines that name the contract


EXACT = {  # line: (8-GPU node, CPU-only machine: the summary or the start of the one-line error)
    "python train.py": (
        {"accelerator": "gpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "bf16-mixed",
         "speed": GPU_SPEED, "data": "DemoShards+ImageDecoder", "model": VAE},
        {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
         "speed": None, "data": "DemoShards+ImageDecoder", "model": VAE}),
    MISSION: (
        {"accelerator": "gpu", "devices": 8, "num_nodes": 1, "strategy": "ddp", "precision": "bf16-mixed",
         "speed": GPU_SPEED, "data": "shards+LatentDecoder", "model": LDM},
        "trainer.devices=8 asks for 8 GPUs but none is visible"),
    f"srun {MISSION}": (
        {"accelerator": "gpu", "devices": 8, "num_nodes": 1, "strategy": "ddp", "precision": "bf16-mixed",
         "speed": GPU_SPEED, "data": "shards+LatentDecoder", "model": LDM},
        "trainer.devices=8 asks for 8 GPUs but none is visible"),
    "sbatch slurm/train.sbatch model=unet_sd15": (
        {"accelerator": "gpu", "devices": 8, "num_nodes": 1, "strategy": "ddp", "precision": "bf16-mixed",
         "speed": GPU_SPEED, "data": "shards+LatentDecoder", "model": LDM},
        "trainer.devices=8 asks for 8 GPUs but none is visible"),
    "sbatch --nodes=4 slurm/train.sbatch model=unet_sd15 data.root=/data/latents": (
        {"accelerator": "gpu", "devices": 8, "num_nodes": 4, "strategy": "ddp", "precision": "bf16-mixed",
         "speed": GPU_SPEED, "data": "shards+LatentDecoder", "model": LDM},
        "trainer.devices=8 asks for 8 GPUs but none is visible"),
    "sbatch --ntasks-per-node=4 --gpus-per-node=4 --time=2-00:00:00 -p a100 slurm/train.sbatch experiment=vae_kl_f8": (
        {"accelerator": "gpu", "devices": 4, "num_nodes": 1, "strategy": "ddp_find_unused_parameters_true",
         "precision": "bf16-mixed", "speed": GPU_SPEED, "data": "shards+ImageDecoder", "model": VAE},
        "trainer.accelerator=gpu but no GPU is visible"),
}


@pytest.mark.parametrize("line", list(EXACT), ids=lambda c: c[:70])
def test_named_lines_resolve_exactly(line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert line in COMMANDS, f"{line!r} is no longer in README.md or slurm/README.md"
    on_node, on_cpu = EXACT[line]
    composed, _ = compose_line(line, tmp_path, monkeypatch)
    assert summary(resolved(composed, NODE)) == on_node
    if isinstance(on_cpu, str):
        with pytest.raises(ConfigError, match=re.escape(on_cpu)):
            resolved(composed, LAPTOP)
    else:
        assert summary(resolved(composed, LAPTOP)) == on_cpu


def test_sd15_brings_sd_scale_trainer_defaults_and_its_data(tmp_path: Path) -> None:
    """Steps, validation, logging and checkpoint cadence come from model=unet_sd15, whatever the trainer."""
    for trainer in ([], ["trainer=gpu"], ["trainer=ddp"]):
        cfg = compose_train(["model=unet_sd15", *trainer], tmp_path)
        t = cfg.trainer
        assert (t.max_steps, t.val_check_interval, t.log_every_n_steps) == (237000, 5000, 50), trainer
        assert cfg.callbacks.last_checkpoint.every_n_train_steps == 2500
        assert cfg.data.root == f"{cfg.paths.data_dir}/sd15_latents"
    assert compose_train(["model=unet_sd15", "trainer.max_steps=10"], tmp_path).trainer.max_steps == 10
    assert compose_train([], tmp_path).trainer.max_steps == 300  # the tiny VAE keeps its CPU minutes


def test_sd15_without_its_latents_stops_with_one_line_naming_data_root(tmp_path: Path) -> None:
    cfg = resolved(compose_train(["model=unet_sd15", "trainer.devices=8"], tmp_path), NODE)
    [line] = [p for p in check_config(cfg) if p.startswith("data.")]
    assert line.startswith(f"data.root={cfg.paths.data_dir}/sd15_latents not found") and "cache_latents" in line


def test_fewer_gpus_than_asked_is_one_line_saying_what_to_pass(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = compose_train(["model=unet_sd15", "trainer.devices=8"], tmp_path)
    with pytest.raises(ConfigError) as error:
        resolved(cfg, Machine(gpus=2, bf16=True))
    assert str(error.value) == ("trainer.devices=8 asks for 8 GPUs but 2 are visible (torch.cuda.device_count(); "
                                "CUDA_VISIBLE_DEVICES=0,1): pass trainer.devices=2, or run where 8 are")
    assert summary(resolved(compose_train(["trainer.devices=-1"], tmp_path), Machine(2, True)))["devices"] == 2


def test_explicit_choices_win_over_the_machine(tmp_path: Path) -> None:
    def on_node(*overrides: str) -> dict:
        return summary(resolved(compose_train(list(overrides), tmp_path), NODE))

    assert on_node("trainer.accelerator=cpu")["accelerator"] == "cpu"
    assert on_node("trainer.precision=32-true")["precision"] == "32-true"
    assert on_node("speed=none")["speed"] is None
    assert on_node("trainer=cpu") | {"data": None} == {
        "accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
        "speed": None, "data": None, "model": VAE}
    assert on_node("trainer.strategy=ddp_find_unused_parameters_false", "trainer.devices=2")["strategy"] \
        == "ddp_find_unused_parameters_false"
    assert summary(resolved(compose_train([], tmp_path), Machine(gpus=1, bf16=False)))["precision"] == "32-true"
    # speed=auto keeps a switch given next to it: the GPU settings with that one changed
    cfg = resolved(compose_train(["+callbacks.speed.compile=regional"], tmp_path), NODE)
    assert (cfg.callbacks.speed._target_, cfg.callbacks.speed.compile) == (GPU_SPEED, "regional")
    assert hydra.utils.instantiate(cfg.callbacks.speed).channels_last is True


def test_the_machine_is_read_from_torch_cuda_in_one_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert Machine.detect() == NODE
    cfg = resolve_machine(compose_train(MISSION.split()[2:], tmp_path))
    assert summary(cfg)["accelerator"] == "gpu" and summary(cfg)["strategy"] == "ddp"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Machine.detect() == LAPTOP


def test_under_srun_the_mission_line_resolves_as_on_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 3 of `srun` (8 tasks on one node): the same resolved trainer, and Lightning takes rank and world
    size from SLURM (the Trainer is built on the CPU here: the accelerator is the only thing swapped)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from pytorch_lightning.strategies import DDPStrategy

    off_slurm = summary(resolved(compose_train(MISSION.split()[2:], tmp_path), NODE))
    for key, value in slurm_env(tasks=8, nodes=1, procid=3).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    cfg = resolved(compose_train(MISSION.split()[2:], tmp_path), NODE)
    assert summary(cfg) == off_slurm
    trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.num_devices, trainer.global_rank, trainer.local_rank) == (8, 8, 3, 3)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters", False) is False  # the LDM needs no search


@pytest.mark.slow
def test_no_arguments_trains_the_tiny_vae_on_the_demo_photos_on_the_cpu(tmp_path: Path) -> None:
    from ldmlab.run import train

    cfg = compose_train(["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                         "data.batch_size=4", "data.num_workers=0"], tmp_path)
    assert train(cfg) is not None
    assert summary(cfg) == EXACT["python train.py"][0 if torch.cuda.is_available() else 1]  # resolved in place
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_train_py_without_gpus_says_what_to_pass_in_one_line(tmp_path: Path) -> None:
    """The real entry point on this CPU-only machine: `trainer.devices=2` with no GPU visible stops before any
    data is built, with the one line and no traceback."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without GPUs")
    data = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={data}",
           "trainer.devices=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("trainer.devices=2 asks for 2 GPUs")]
    assert line.endswith("none is visible (torch.cuda.device_count() = 0): run on a GPU node, or pass "
                         "trainer.accelerator=cpu for 2 CPU processes (gloo)") and not data.exists()


def evaluate_lines() -> list[str]:
    """Every `python -m ldmlab.evaluate` line in the READMEs' bash blocks (a `$(ls ... | head -1)` checkpoint
    as the shell would give it: a path)."""
    return [re.sub(r"\$\(ls [^)]*\)", "outputs/train/runs/x/checkpoints/last.ckpt", line) for doc in DOCS for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.DOTALL)
            for line in block.splitlines() if line.startswith("python -m ldmlab.evaluate ")]


@pytest.mark.parametrize("line", evaluate_lines(), ids=lambda c: c[:70])
def test_evaluate_lines_resolve_as_written(line: str) -> None:
    """guidance=1,2,4 as typed is a list of scales (not a Hydra sweep); n, sampler, steps and features land."""
    from hydra import compose, initialize_config_dir

    from ldmlab.configs import CONF_DIR
    from ldmlab.evaluate import _lists_from_commas

    args = _lists_from_commas(line.split()[3:])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=args)
    said = dict(a.split("=", 1) for a in line.split()[3:])
    assert list(cfg.guidance) == [float(g) for g in said["guidance"].split(",")]
    assert cfg.n == int(said["n"]) and cfg.features.name == said["features.name"]
    for key in ("sampler", "steps", "features.path"):
        if key in said:
            assert str(OmegaConf.select(cfg, key)) == said[key]


def test_the_readme_shows_the_evaluate_command() -> None:
    assert any("guidance=1,1.5,2,3,4,6" in line for line in evaluate_lines())
