"""The `saeft` command: dispatch, help, `saeft env`, YAML + flag precedence, tiny `saeft train` runs (under accelerate
launch, and as 2 torchrun processes), the model card's quick start executed on the saved runs, and `saeft compare`."""

import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import make_image_folder, make_tiny_clip, torchrun

ROOT = Path(__file__).resolve().parents[1]
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:4]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def cli(*argv: str) -> int:
    from saeft_hf.cli import main

    return main(list(argv))


def test_help_lists_every_command(capsys):
    from saeft_hf.cli import COMMANDS

    assert cli("--help") == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: saeft <command> [flags]")
    for name in ("train", "train-sae", "evaluate", "interpret", "demo", "env", "compare"):
        assert name in COMMANDS and re.search(rf"^  {re.escape(name)} +\S", text, flags=re.M), name
    assert cli() == 2 and "usage: saeft" in capsys.readouterr().err  # no command: usage on stderr, status 2
    assert cli("trian") == 2
    assert "unknown command 'trian'. Did you mean `saeft train`?" in capsys.readouterr().err


def test_command_help_is_that_commands_parser(capsys):
    from saeft_hf.commands.train import DataArguments
    from saeft_hf.config import SAEFTConfig
    from saeft_hf.pipeline import ModelArguments

    with pytest.raises(SystemExit) as exit_info:
        cli("train", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: saeft train ")
    own = set(SAEFTConfig.__dataclass_fields__) - set(SAEFTConfig.__mro__[1].__dataclass_fields__)
    assert {"lambda_reg", "lambda_add", "mu", "regularizer", "use_lora", "global_batch_size"} <= own
    for name in own | set(DataArguments.__dataclass_fields__) | set(ModelArguments.__dataclass_fields__):
        assert f"--{name} " in text or f"--{name}\n" in text, name
    flat = " ".join(text.split())  # argparse wraps the epilog to the terminal width
    assert "--config FILE.yaml" in flat and "flags given on the command line override it" in flat
    assert sys.argv[0] != "saeft train"  # the program name was borrowed for the parser only

    # `saeft help X` = `saeft X --help`; every command answers --help with its own usage line.
    for name in ("train-sae", "evaluate", "interpret", "demo", "env", "compare"):
        with pytest.raises(SystemExit) as exit_info:
            cli("help", name)
        assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: saeft {name}")


def test_env_prints_the_versions_in_use(capsys):
    import platform

    import accelerate
    import datasets
    import huggingface_hub
    import peft
    import transformers

    import saeft_hf

    assert cli("env") == 0
    text = capsys.readouterr().out
    assert text.startswith("Copy-paste the following information when reporting an issue:")
    lines = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- "))
    assert lines["python"] == platform.python_version() and lines["platform"] == platform.platform()
    assert lines["saeft-hf"] == saeft_hf.__version__
    for name, module in (("torch", torch), ("transformers", transformers), ("datasets", datasets), ("peft", peft),
                         ("accelerate", accelerate), ("huggingface_hub", huggingface_hub)):
        assert lines[name] == module.__version__, name
    assert lines["CUDA available"].startswith(str(torch.cuda.is_available()))
    assert cli("env", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {k: v for k, v in lines.items()}


def test_the_console_script_is_declared():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].split() == ["saeft", "=", "saeft_hf.cli:main"]


def test_the_console_script_is_installed():
    """The installed package exposes `saeft` (after `pip install -e .` of a checkout that declares it)."""
    from saeft_hf.cli import main

    scripts = importlib.metadata.entry_points(group="console_scripts", name="saeft")
    assert scripts, ("no `saeft` console script in the installed metadata: reinstall the package (`pip install -e .`; "
                     "setup.cfg declares it)")
    assert next(iter(scripts)).value == "saeft_hf.cli:main"
    assert next(iter(scripts)).load() is main
    script = shutil.which("saeft") or shutil.which("saeft", path=str(Path(sys.executable).parent))
    assert script, "the `saeft` script is not on PATH nor next to this Python"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "train-sae" in proc.stdout, proc.stderr[-2000:]


def test_yaml_values_are_defaults_that_flags_override(tmp_path):
    from saeft_hf.commands.train import DataArguments
    from saeft_hf.config import SAEFTConfig
    from saeft_hf.pipeline import ModelArguments, parse_args
    from saeft_hf.validation import SAEFTConfigError

    types = (ModelArguments, DataArguments, SAEFTConfig)
    config = str(ROOT / "recipes" / "configs" / "imagenet_vit_b16.yaml")
    model, data, train = parse_args(types, ["--config", config, "--learning_rate", "2e-5", "--wise_ft_alphas", "0",
                                            "1", "--use_cpu", "--output_dir", str(tmp_path)])
    assert train.learning_rate == 2e-5 and data.wise_ft_alphas == [0.0, 1.0]  # the flags
    assert train.weight_decay == 0.1 and train.lambda_reg == 70.0 and train.num_train_epochs == 10  # the YAML
    assert model.model_name_or_path == "openai/clip-vit-base-patch16" and data.streaming is True
    assert train.output_dir == str(tmp_path)
    # The flag wins wherever it stands relative to --config.
    _, _, train = parse_args(types, ["--learning_rate", "3e-5", "--config", config, "--use_cpu"])
    assert train.learning_rate == 3e-5

    # `expected:` is validated and left out of the options; any other unknown key is still an error.
    base = {"model_name_or_path": "m", "output_dir": str(tmp_path), "use_cpu": True}
    good = {"source": "a table", "zero_shot": {"imagenet": 68.3}, "published": {"FT": {"imagenet": 81.3}}}

    def parse(values):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(values))
        return parse_args(types, ["--config", str(path)])

    assert parse({**base, "expected": good})[2].learning_rate == SAEFTConfig.__dataclass_fields__["learning_rate"].default
    with pytest.raises(SAEFTConfigError, match=r"Unknown keys in .*\['expcted'\]"):
        parse({**base, "expcted": good})
    for bad, message in (
        ({"zero_shot": {"imagenet": 68.3}}, "needs `source`"),
        ({**good, "zero_shot": {"imagenet": 683}}, r"imagenet = 683 is not a percentage in \[0, 100\]"),
        ({**good, "zero_shot": {"imagenet": "high"}}, "is not `set_name: number`"),
        ({**good, "tolerence": 1}, r"unknown keys \['tolerence'\]"),
        ({**good, "published": {"FT": []}}, r"published.FT must be a mapping"),
    ):
        with pytest.raises(SAEFTConfigError, match=message):
            parse({**base, "expected": bad})


# ----------------------------------------------------------------------------------------------------------------
# Tiny runs through the command, and what they leave behind


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    clip = make_tiny_clip(tmp / "clip")
    make_image_folder(tmp / "train", per_class=8, names=WNIDS, seed=0)
    make_image_folder(tmp / "val", per_class=3, names=WNIDS, seed=1)
    make_image_folder(tmp / "shift", per_class=3, names=[WNIDS[1], WNIDS[3]], seed=2)
    (tmp / "eval_sets.yaml").write_text(
        f"eval_sets:\n  - name: tiny_r\n    data_dir: {tmp / 'shift'}\n    kind: subset\n    class_indices: [1, 3]\n")
    config = {
        "model_name_or_path": str(clip), "train_dir": str(tmp / "train"), "validation_dir": str(tmp / "val"),
        "max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "learning_rate": 1.0e-3, "lambda_reg": 70.0, "warmup_steps": 0, "use_cpu": True, "report_to": "none",
        "save_strategy": "no", "sae_epochs": 2, "sae_batch_size": 8, "sae_k": 4, "embedding_batch_size": 16,
        "eval_sets_config": str(tmp / "eval_sets.yaml"), "wise_ft_alphas": [0.0, 0.5, 1.0],
        "dataloader_num_workers": 0,
        "expected": {"source": "nowhere", "zero_shot": {"imagenet": 50.0}},  # parsed and ignored by training
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    return tmp


def saeft_command() -> list[str]:
    """The installed console script when there is one, else the same entry point through `python -m`."""
    script = shutil.which("saeft", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "saeft_hf.cli"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def full_run(workspace):
    """`accelerate launch -m saeft_hf.cli train --config tiny.yaml --lambda_reg 3 ...` (one CPU process)."""
    out = workspace / "full"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "saeft_hf.cli", "train",
                "--config", "tiny.yaml", "--lambda_reg", "3", "--output_dir", str(out)], workspace)
    assert "x 1 process(es)" in proc.stderr
    return out


@pytest.fixture(scope="module")
def lora_run(workspace):
    out = workspace / "lora"
    run([*saeft_command(), "train", "--config", "tiny.yaml", "--use_lora", "--lora_r", "4", "--output_dir", str(out)],
        workspace)
    return out


def quick_start(run_dir: Path) -> dict:
    """Execute the card's quick start with its path line pointed at `run_dir`; returns its namespace."""
    from saeft_hf.hub import QUICK_START_PATH_LINE

    card = (run_dir / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", card, flags=re.S)[0]
    first, rest = code.split("\n", 1)
    assert first == QUICK_START_PATH_LINE.format(target="<this repo id or local folder>")
    namespace: dict = {}
    exec(compile(f"path = {str(run_dir)!r}\n{rest}", f"{run_dir.name}/README.md quick start", "exec"), namespace)
    return namespace


def check_sae_and_wise_ft(ns: dict, run_dir: Path) -> None:
    from saeft_hf import SAEFTCLIPForImageClassification, SparseAutoencoder

    sae = SparseAutoencoder.from_pretrained(run_dir / "sae")
    assert torch.equal(ns["codes"], sae(ns["out"].representation).codes)
    assert ns["codes"].shape == (1, sae.config.d_sae) and 0 < int((ns["codes"] != 0).sum()) <= sae.config.k
    wise = SAEFTCLIPForImageClassification.from_pretrained(run_dir / "wise_ft")
    assert type(ns["wise"]) is SAEFTCLIPForImageClassification and not hasattr(ns["wise"], "peft_config")
    for name, value in wise.state_dict().items():
        assert torch.equal(ns["wise"].state_dict()[name], value), name


def test_train_through_accelerate_launch_with_yaml_and_override(full_run):
    results = json.loads((full_run / "eval_results.json").read_text())
    assert set(results["final"]) >= {"validation", "tiny_r", "avg_shift"}
    card = (full_run / "README.md").read_text()
    training = card[card.index("## Training"):card.index("## Framework versions")]
    assert "| lambda_reg | 3 |" in training and "| learning_rate | 0.001 |" in training  # flag over YAML; YAML


def test_full_model_card_quick_start_runs(full_run):
    from saeft_hf import SAEFTCLIPForImageClassification
    from saeft_hf.environment import framework_versions

    ns = quick_start(full_run)
    model = SAEFTCLIPForImageClassification.from_pretrained(full_run).eval()
    with torch.no_grad():
        expected = model(**ns["inputs"]).logits
    assert type(ns["model"]) is SAEFTCLIPForImageClassification
    assert torch.equal(ns["out"].logits, expected) and expected.shape == (1, 4)
    # transformers alone (CLIPVisionModelWithProjection + the head's weights) gives the same logits.
    torch.testing.assert_close(ns["logits"], expected, rtol=0, atol=1e-6)
    check_sae_and_wise_ft(ns, full_run)

    card = (full_run / "README.md").read_text()
    for name, version in framework_versions().items():
        assert f"- {name}: {version}\n" in card
    assert "author        = {Morelli, Fabian and Uselis, Arnas and Sonthalia, Ankit and Oh, Seong Joon}" in card
    assert "eprint        = {2605.15961}" in card
    results = json.loads((full_run / "eval_results.json").read_text())["wise_ft"]
    section = card[card.index("## WiSE-FT"):card.index("## Training")]
    assert f"Chosen: **alpha {results['best_alpha']:g}**, the best accuracy on `train_holdout`" in section
    assert f"| {results['best_alpha']:g} (chosen) |" in section and section.count("| 0.5") == 1


def test_adapter_card_quick_start_runs(lora_run):
    from peft import PeftModel

    from saeft_hf.lora import load_classifier

    ns = quick_start(lora_run)
    assert isinstance(ns["model"], PeftModel)
    model = load_classifier(str(lora_run)).eval()
    with torch.no_grad():
        assert torch.equal(ns["out"].logits, model(**ns["inputs"]).logits)
    check_sae_and_wise_ft(ns, lora_run)


def test_compare_checks_alpha_zero_against_the_expected_numbers(full_run, workspace, capsys):
    results = json.loads((full_run / "eval_results.json").read_text())
    zero = results["wise_ft"]["results"][results["wise_ft"]["alphas"].index(0.0)]
    expected = {"imagenet": round(100 * zero["id"], 1), "tiny_r": round(100 * zero["tiny_r"], 1)}
    config = workspace / "expected.yaml"
    config.write_text(yaml.safe_dump({"expected": {"source": "this test", "tolerance": 0.5, "zero_shot": expected,
                                                   "published": {"FT": {"imagenet": 81.3}}}}))
    assert cli("compare", str(full_run), "--config", str(config)) == 0
    text = capsys.readouterr().out
    assert f"| imagenet | {100 * results['final']['id']:.1f} |" in text  # the run's ID set is its `validation`
    assert text.count("| ok |") == 2 and "| 81.3 |" in text
    config.write_text(yaml.safe_dump({"expected": {"source": "this test", "tolerance": 0.5,
                                                   "zero_shot": {**expected, "tiny_r": expected["tiny_r"] + 2}}}))
    with pytest.raises(SystemExit) as exit_info:
        cli("compare", str(full_run / "eval_results.json"), "--config", str(config))
    assert exit_info.value.code == 1
    assert f"tiny_r: alpha 0 gives {expected['tiny_r']:.1f}, expected {expected['tiny_r'] + 2:.1f} +- 0.5" in (
        capsys.readouterr().out)
    # The shipped configs carry the section it reads.
    from saeft_hf.expected import load_expected

    for name in ("imagenet_vit_b16.yaml", "imagenet_vit_b16_lora.yaml"):
        numbers = load_expected(str(ROOT / "recipes" / "configs" / name))
        assert numbers.zero_shot["imagenet"] == 68.3 and numbers.published["FT"]["avg_shift"] == 53.7


@pytest.mark.slow
def test_train_as_two_torchrun_processes(workspace, full_run):
    """`torchrun --nproc_per_node 2 -m saeft_hf.cli train`: what `accelerate launch --multi_gpu` runs on GPUs."""
    out = workspace / "ddp"
    proc = run([*torchrun(2), "-m", "saeft_hf.cli", "train", "--config", "tiny.yaml", "--lambda_reg", "3",
                "--per_device_train_batch_size", "2", "--output_dir", str(out)], workspace)
    assert "global batch 4 = 2 per device x 2 process(es) x 1 accumulation step(s)" in proc.stderr
    results = json.loads((out / "eval_results.json").read_text())
    one = json.loads((full_run / "eval_results.json").read_text())
    # Both runs evaluate every image exactly once, whatever the process count.
    assert results["num_examples"] == one["num_examples"]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_demo_runs_through_the_command(tmp_path, capsys):
    """`saeft demo` (defaults: every method into outputs/demo, as `make demo`), here cut to the zero-shot row."""
    from saeft_hf.benchmarks.experiment import DigitExperimentConfig

    assert DigitExperimentConfig.__dataclass_fields__["output_dir"].default == "outputs/demo"
    out = tmp_path / "demo"
    assert cli("demo", "--output_dir", str(out), "--methods", "zeroshot", "--max_steps", "3", "--batch_size", "32",
               "--max_eval_samples", "40", "--max_train_samples", "200", "--sae_epochs", "2") == 0
    printed = capsys.readouterr().out
    assert "| zeroshot |" in printed and f"outputs in {out}" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"zeroshot"}
    assert (out / "results.md").read_text() in printed


def test_demo_without_its_extra_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"The demo needs mlxtend \(the `demo` extra\): pip install 'saeft-hf\[demo\]'"):
        cli("demo", "--output_dir", str(tmp_path))
    assert not (tmp_path / "results.json").exists()
